//! A deliberately naive forward pass of a CLA decoder, written independently of the crate's
//! decoder: plain loops over `Vec<f64>`, no cache, no ndarray, no paging. Every layer is
//! computed for every position; a consumer layer attends over the keys and values its
//! producer computed earlier in the same pass. It is slow and obviously right.

// Index loops on purpose: the reference reads like the equations, not like idiomatic Rust.
#![allow(clippy::needless_range_loop)]

use cla_model::ModelWeights;

type Matrix = Vec<Vec<f64>>;

fn to_matrix(a: &ndarray::Array2<f32>) -> Matrix {
    a.outer_iter()
        .map(|row| row.iter().map(|&v| v as f64).collect())
        .collect()
}

fn to_vector(a: &ndarray::Array1<f32>) -> Vec<f64> {
    a.iter().map(|&v| v as f64).collect()
}

/// `w x` for a `[out][in]` matrix.
fn matvec(w: &Matrix, x: &[f64]) -> Vec<f64> {
    let mut y = vec![0.0; w.len()];
    for o in 0..w.len() {
        let mut acc = 0.0;
        for i in 0..x.len() {
            acc += w[o][i] * x[i];
        }
        y[o] = acc;
    }
    y
}

fn rms_norm(x: &[f64], scale: &[f64], eps: f64) -> Vec<f64> {
    let mut ms = 0.0;
    for v in x {
        ms += v * v;
    }
    ms /= x.len() as f64;
    let inv = 1.0 / (ms + eps).sqrt();
    let mut y = vec![0.0; x.len()];
    for i in 0..x.len() {
        y[i] = x[i] * inv * scale[i];
    }
    y
}

/// Rotates each head of `x` (heads of `d` values) to `pos`, Hugging Face rotate_half style.
fn rope(x: &mut [f64], d: usize, pos: usize, theta: f64) {
    let half = d / 2;
    let heads = x.len() / d;
    for h in 0..heads {
        let base = h * d;
        for i in 0..half {
            let inv_freq = 1.0 / theta.powf((2 * i) as f64 / d as f64);
            let angle = pos as f64 * inv_freq;
            let (c, s) = (angle.cos(), angle.sin());
            let a = x[base + i];
            let b = x[base + i + half];
            x[base + i] = a * c - b * s;
            x[base + i + half] = b * c + a * s;
        }
    }
}

/// Logits `[position][vocab]` for every position of `tokens`.
pub fn forward(w: &ModelWeights, tokens: &[u32]) -> Vec<Vec<f32>> {
    let c = &w.config;
    let eps = c.rms_norm_eps;
    let d = c.head_dim;
    let q_heads = c.num_attention_heads;
    let kv_heads = c.num_key_value_heads;
    let per_kv = q_heads / kv_heads;
    let n = tokens.len();
    let sources = c.kv_sharing.sources().to_vec();

    let embed = to_matrix(&w.embed_tokens);
    let mut x: Vec<Vec<f64>> = tokens.iter().map(|&t| embed[t as usize].clone()).collect();
    // keys[layer][pos], values[layer][pos]: filled for producer layers only.
    let mut keys: Vec<Vec<Vec<f64>>> = vec![Vec::new(); sources.len()];
    let mut values: Vec<Vec<Vec<f64>>> = vec![Vec::new(); sources.len()];

    for (layer, lw) in w.layers.iter().enumerate() {
        let input_norm = to_vector(&lw.input_norm);
        let wq = to_matrix(&lw.q_proj);
        let wo = to_matrix(&lw.o_proj);
        let h: Vec<Vec<f64>> = x.iter().map(|xi| rms_norm(xi, &input_norm, eps)).collect();
        let mut q: Vec<Vec<f64>> = h.iter().map(|hi| matvec(&wq, hi)).collect();
        for (pos, qi) in q.iter_mut().enumerate() {
            rope(qi, d, pos, c.rope_theta);
        }
        let is_producer = sources[layer] == layer;
        if is_producer {
            let kv = lw.kv.as_ref().expect("a producer has K/V weights");
            let wk = to_matrix(&kv.k_proj);
            let wv = to_matrix(&kv.v_proj);
            for pos in 0..n {
                let hk = match &kv.kv_norm {
                    Some(s) => rms_norm(&x[pos], &to_vector(s), eps),
                    None => h[pos].clone(),
                };
                let mut k = matvec(&wk, &hk);
                rope(&mut k, d, pos, c.rope_theta);
                keys[layer].push(k);
                values[layer].push(matvec(&wv, &hk));
            }
        } else {
            assert!(lw.kv.is_none(), "a consumer has no K/V weights");
        }
        // Attention over the producer's keys and values (itself for a producer).
        let src = sources[layer];
        let mut attn = vec![vec![0.0; q_heads * d]; n];
        for pos in 0..n {
            for head in 0..q_heads {
                let g = head / per_kv;
                let mut scores = Vec::new();
                for t in 0..=pos {
                    let mut s = 0.0;
                    for i in 0..d {
                        s += q[pos][head * d + i] * keys[src][t][g * d + i];
                    }
                    scores.push(s / (d as f64).sqrt());
                }
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let mut total = 0.0;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    total += *s;
                }
                for t in 0..=pos {
                    for i in 0..d {
                        attn[pos][head * d + i] += scores[t] / total * values[src][t][g * d + i];
                    }
                }
            }
        }
        let post_norm = to_vector(&lw.post_attention_norm);
        let gate = to_matrix(&lw.gate_proj);
        let up = to_matrix(&lw.up_proj);
        let down = to_matrix(&lw.down_proj);
        for pos in 0..n {
            let o = matvec(&wo, &attn[pos]);
            for i in 0..o.len() {
                x[pos][i] += o[i];
            }
            let g = rms_norm(&x[pos], &post_norm, eps);
            let a = matvec(&gate, &g);
            let b = matvec(&up, &g);
            let mut m = vec![0.0; a.len()];
            for i in 0..a.len() {
                m[i] = a[i] / (1.0 + (-a[i]).exp()) * b[i];
            }
            let dn = matvec(&down, &m);
            for i in 0..dn.len() {
                x[pos][i] += dn[i];
            }
        }
    }
    let final_norm = to_vector(&w.final_norm);
    let head = to_matrix(w.lm_head());
    x.iter()
        .map(|xi| {
            matvec(&head, &rms_norm(xi, &final_norm, eps))
                .into_iter()
                .map(|v| v as f32)
                .collect()
        })
        .collect()
}
