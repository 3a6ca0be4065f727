// The rotation of one RoPE dim pair: (cos, sin) of position * inv_freq.
//
// The angle is reduced to [-pi, pi] with a two-part 2*pi (Cody-Waite) before cos/sin: GPU
// sin/cos are only accurate in that range, and RoPE angles reach the context length.

// 2*pi = TWO_PI_HI + TWO_PI_LO; TWO_PI_HI has 8 significant bits so k * TWO_PI_HI is exact.
const TWO_PI_HI: f32 = 6.28125;
const TWO_PI_LO: f32 = 1.9353071795864769e-3;
const INV_TWO_PI: f32 = 0.15915494309189535;

fn rope_cos_sin(position: u32, inv_freq: f32) -> vec2<f32> {
    let angle = f32(position) * inv_freq;
    let k = round(angle * INV_TWO_PI);
    let r = (angle - k * TWO_PI_HI) - k * TWO_PI_LO;
    return vec2<f32>(cos(r), sin(r));
}
