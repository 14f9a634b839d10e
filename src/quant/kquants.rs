//! The 256-element K-quant super-blocks (ggml-common.h `block_q4_K`, `block_q5_K`,
//! `block_q6_K`), quantized as ggml's `quantize_row_q{4,5,6}_K_ref` (no imatrix).
//!
//! | format | layout (bytes)                                              | value                        |
//! |--------|-------------------------------------------------------------|------------------------------|
//! | Q4_K   | d:f16, dmin:f16, scales:[u8;12], qs:[u8;128]          = 144 | d*sc_j*q - dmin*m_j, q 0..16 |
//! | Q5_K   | d:f16, dmin:f16, scales:[u8;12], qh:[u8;32], qs:[u8;128] = 176 | same, q 0..32           |
//! | Q6_K   | ql:[u8;128], qh:[u8;64], scales:[i8;16], d:f16 (last!) = 210 | d*sc_j*(q - 32), q 0..64 |
//!
//! Q4_K/Q5_K: 8 sub-blocks of 32, each with a 6-bit scale and 6-bit min (packed into 12 bytes,
//! see `math::get_scale_min_k4`). Q6_K: 16 sub-blocks of 16 with signed 8-bit scales.
//!
//! All three follow the same recipe: (1) fit every sub-block on its own (scale search in
//! `math`), (2) quantize the sub-block scales against the super-block's largest one and store
//! d/dmin as fp16, (3) requantize every value with the *stored* (rounded) scales — except
//! where a stored scale is zero: ggml then `continue`s and keeps the levels from step (1).
//!
//! Bit packing (per 64 values for Q4_K/Q5_K, per 128 for Q6_K):
//! - Q4_K `qs`: chunk c (64 values) -> 32 bytes, low nibble = value c*64+l, high = c*64+32+l.
//! - Q5_K: same nibbles; `qh[l]` bit 2c = bit 4 of value c*64+l, bit 2c+1 = of value c*64+32+l.
//! - Q6_K: per half h (128 values, 64 `ql` bytes, 32 `qh` bytes): `ql[l]` = v[l] | v[l+64]<<4,
//!   `ql[l+32]` = v[l+32] | v[l+96]<<4 (low 4 bits each); `qh[l]` holds the top 2 bits of
//!   v[l], v[l+32], v[l+64], v[l+96] at shifts 0, 2, 4, 6.

use super::math::GROUP_MAX_EPS;
use super::math::{
    fp16, get_scale_min_k4, make_qkx2_quants, make_qx_quants, nearest_int, pack_scale_min_k4,
};
use super::{Block, GgmlType};
use half::f16;

/// QK_K: values per super-block.
const QK_K: usize = 256;

fn f16_at(b: &[u8], i: usize) -> f16 {
    f16::from_le_bytes([b[i], b[i + 1]])
}

/// Steps (1)-(3) shared by Q4_K and Q5_K: returns (d, dmin, packed scales, levels 0..=nmax).
/// `rmin/rdelta/nstep` are the make_qkx2_quants search parameters of the format.
fn quantize_scale_min_k(
    x: &[f32],
    nmax: i32,
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f16, f16, [u8; 12], [u8; QK_K]) {
    let mut levels = [0u8; QK_K];
    let mut laux = [0u8; 32];
    let mut weights = [0f32; 32];
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let mut max_scale = 0.0f32;
    let mut max_min = 0.0f32;
    for j in 0..8 {
        let xs: &[f32; 32] = x[32 * j..32 * j + 32]
            .try_into()
            .expect("256 values per super-block");
        let mut sum_x2 = 0.0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        // Weight each value by the sub-block's RMS plus its own magnitude: large values
        // matter more, but small ones are never ignored.
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let lj: &mut [u8; 32] = (&mut levels[32 * j..32 * j + 32])
            .try_into()
            .expect("32 levels");
        let sm = make_qkx2_quants(nmax, xs, &weights, lj, &mut laux, rmin, rdelta, nstep);
        scales[j] = sm.scale;
        mins[j] = sm.min;
        if sm.scale > max_scale {
            max_scale = sm.scale;
        }
        if sm.min > max_min {
            max_min = sm.min;
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    for j in 0..8 {
        // C stores nearest_int(...) into a uint8_t (wraps mod 256) before MIN(63, .).
        ls[j] = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        lm[j] = (nearest_int(inv_min * mins[j]) as u8).min(63);
    }
    let packed = pack_scale_min_k4(&ls, &lm);
    let d = fp16(max_scale / 63.0);
    let dmin = fp16(max_min / 63.0);
    let (df, dminf) = (d.to_f32(), dmin.to_f32());
    for j in 0..8 {
        let (sc, m) = get_scale_min_k4(j, &packed);
        let dj = df * sc as f32;
        if dj == 0.0 {
            continue; // keep make_qkx2_quants' levels, as ggml does
        }
        let dm = dminf * m as f32;
        for ii in 0..32 {
            let l = nearest_int((x[32 * j + ii] + dm) / dj);
            levels[32 * j + ii] = l.clamp(0, nmax) as u8;
        }
    }
    (d, dmin, packed, levels)
}

/// `block_q4_K`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ4K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    pub qs: [u8; QK_K / 2],
}

impl Block for BlockQ4K {
    const TYPE: GgmlType = GgmlType::Q4K;
    const QK: usize = QK_K;
    const SIZE: usize = 144;

    fn quantize(x: &[f32]) -> Self {
        let (d, dmin, scales, l) = quantize_scale_min_k(x, 15, -1.0, 0.1, 20);
        let mut qs = [0u8; QK_K / 2];
        for c in 0..4 {
            for i in 0..32 {
                qs[32 * c + i] = l[64 * c + i] | (l[64 * c + 32 + i] << 4);
            }
        }
        BlockQ4K {
            d,
            dmin,
            scales,
            qs,
        }
    }

    fn dequantize(&self, y: &mut [f32]) {
        let (d, min) = (self.d.to_f32(), self.dmin.to_f32());
        for c in 0..4 {
            let (sc1, m1) = get_scale_min_k4(2 * c, &self.scales);
            let (sc2, m2) = get_scale_min_k4(2 * c + 1, &self.scales);
            let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
            let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
            for i in 0..32 {
                let q = self.qs[32 * c + i];
                y[64 * c + i] = d1 * (q & 0xF) as f32 - m1;
                y[64 * c + 32 + i] = d2 * (q >> 4) as f32 - m2;
            }
        }
    }

    fn write(&self, out: &mut [u8]) {
        out[0..2].copy_from_slice(&self.d.to_le_bytes());
        out[2..4].copy_from_slice(&self.dmin.to_le_bytes());
        out[4..16].copy_from_slice(&self.scales);
        out[16..144].copy_from_slice(&self.qs);
    }

    fn read(b: &[u8]) -> Self {
        let mut scales = [0u8; 12];
        scales.copy_from_slice(&b[4..16]);
        let mut qs = [0u8; QK_K / 2];
        qs.copy_from_slice(&b[16..144]);
        BlockQ4K {
            d: f16_at(b, 0),
            dmin: f16_at(b, 2),
            scales,
            qs,
        }
    }
}

/// `block_q5_K`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ5K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    pub qh: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 2],
}

impl Block for BlockQ5K {
    const TYPE: GgmlType = GgmlType::Q5K;
    const QK: usize = QK_K;
    const SIZE: usize = 176;

    fn quantize(x: &[f32]) -> Self {
        let (d, dmin, scales, l) = quantize_scale_min_k(x, 31, -0.5, 0.1, 15);
        let mut qs = [0u8; QK_K / 2];
        let mut qh = [0u8; QK_K / 8];
        for c in 0..4 {
            for i in 0..32 {
                let (lo, hi) = (l[64 * c + i], l[64 * c + 32 + i]);
                qs[32 * c + i] = (lo & 0xF) | ((hi & 0xF) << 4);
                qh[i] |= ((lo >> 4) << (2 * c)) | ((hi >> 4) << (2 * c + 1));
            }
        }
        BlockQ5K {
            d,
            dmin,
            scales,
            qh,
            qs,
        }
    }

    fn dequantize(&self, y: &mut [f32]) {
        let (d, min) = (self.d.to_f32(), self.dmin.to_f32());
        for c in 0..4 {
            let (sc1, m1) = get_scale_min_k4(2 * c, &self.scales);
            let (sc2, m2) = get_scale_min_k4(2 * c + 1, &self.scales);
            let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
            let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
            for i in 0..32 {
                let q = self.qs[32 * c + i];
                let h = self.qh[i];
                let lo = (q & 0xF) + (((h >> (2 * c)) & 1) << 4);
                let hi = (q >> 4) + (((h >> (2 * c + 1)) & 1) << 4);
                y[64 * c + i] = d1 * lo as f32 - m1;
                y[64 * c + 32 + i] = d2 * hi as f32 - m2;
            }
        }
    }

    fn write(&self, out: &mut [u8]) {
        out[0..2].copy_from_slice(&self.d.to_le_bytes());
        out[2..4].copy_from_slice(&self.dmin.to_le_bytes());
        out[4..16].copy_from_slice(&self.scales);
        out[16..48].copy_from_slice(&self.qh);
        out[48..176].copy_from_slice(&self.qs);
    }

    fn read(b: &[u8]) -> Self {
        let mut scales = [0u8; 12];
        scales.copy_from_slice(&b[4..16]);
        let mut qh = [0u8; QK_K / 8];
        qh.copy_from_slice(&b[16..48]);
        let mut qs = [0u8; QK_K / 2];
        qs.copy_from_slice(&b[48..176]);
        BlockQ5K {
            d: f16_at(b, 0),
            dmin: f16_at(b, 2),
            scales,
            qh,
            qs,
        }
    }
}

/// `block_q6_K` (note: d is the LAST field).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    pub d: f16,
}

impl Block for BlockQ6K {
    const TYPE: GgmlType = GgmlType::Q6K;
    const QK: usize = QK_K;
    const SIZE: usize = 210;

    fn quantize(x: &[f32]) -> Self {
        let mut l = [0u8; QK_K];
        let mut scales_f = [0f32; 16];
        let mut max_scale = 0.0f32;
        let mut max_abs_scale = 0.0f32;
        for ib in 0..16 {
            let xs: &[f32; 16] = x[16 * ib..16 * ib + 16]
                .try_into()
                .expect("256 values per super-block");
            let ls: &mut [u8; 16] = (&mut l[16 * ib..16 * ib + 16])
                .try_into()
                .expect("16 levels");
            let s = make_qx_quants(32, xs, ls);
            scales_f[ib] = s;
            if s.abs() > max_abs_scale {
                max_abs_scale = s.abs();
                max_scale = s; // signed: the largest scale maps to -128 below
            }
        }
        let mut blk = BlockQ6K {
            ql: [0; QK_K / 2],
            qh: [0; QK_K / 4],
            scales: [0; 16],
            d: fp16(0.0),
        };
        if max_abs_scale < GROUP_MAX_EPS {
            return blk; // all-zero block (ggml memsets it)
        }
        let iscale = -128.0 / max_scale;
        blk.d = fp16(1.0 / iscale);
        for (s, &sf) in blk.scales.iter_mut().zip(&scales_f) {
            *s = nearest_int(iscale * sf).min(127) as i8;
        }
        let df = blk.d.to_f32();
        for j in 0..16 {
            let dj = df * blk.scales[j] as f32;
            if dj == 0.0 {
                continue; // keep make_qx_quants' levels
            }
            for ii in 0..16 {
                let q = nearest_int(x[16 * j + ii] / dj).clamp(-32, 31);
                l[16 * j + ii] = (q + 32) as u8;
            }
        }
        for h in 0..2 {
            let (lv, ql, qh) = (
                &l[128 * h..128 * h + 128],
                &mut blk.ql[64 * h..64 * h + 64],
                &mut blk.qh[32 * h..32 * h + 32],
            );
            for i in 0..32 {
                ql[i] = (lv[i] & 0xF) | ((lv[i + 64] & 0xF) << 4);
                ql[i + 32] = (lv[i + 32] & 0xF) | ((lv[i + 96] & 0xF) << 4);
                qh[i] = (lv[i] >> 4)
                    | ((lv[i + 32] >> 4) << 2)
                    | ((lv[i + 64] >> 4) << 4)
                    | ((lv[i + 96] >> 4) << 6);
            }
        }
        blk
    }

    fn dequantize(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        for h in 0..2 {
            let (ql, qh, sc) = (
                &self.ql[64 * h..],
                &self.qh[32 * h..],
                &self.scales[8 * h..],
            );
            let y = &mut y[128 * h..128 * h + 128];
            for i in 0..32 {
                let is = i / 16;
                let q1 = ((ql[i] & 0xF) | ((qh[i] & 3) << 4)) as i32 - 32;
                let q2 = ((ql[i + 32] & 0xF) | (((qh[i] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((ql[i] >> 4) | (((qh[i] >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((ql[i + 32] >> 4) | (((qh[i] >> 6) & 3) << 4)) as i32 - 32;
                // C: d * sc * q, evaluated as (d*sc)*q.
                y[i] = d * sc[is] as f32 * q1 as f32;
                y[i + 32] = d * sc[is + 2] as f32 * q2 as f32;
                y[i + 64] = d * sc[is + 4] as f32 * q3 as f32;
                y[i + 96] = d * sc[is + 6] as f32 * q4 as f32;
            }
        }
    }

    fn write(&self, out: &mut [u8]) {
        out[0..128].copy_from_slice(&self.ql);
        out[128..192].copy_from_slice(&self.qh);
        for (o, &s) in out[192..208].iter_mut().zip(&self.scales) {
            *o = s as u8;
        }
        out[208..210].copy_from_slice(&self.d.to_le_bytes());
    }

    fn read(b: &[u8]) -> Self {
        let mut ql = [0u8; QK_K / 2];
        ql.copy_from_slice(&b[0..128]);
        let mut qh = [0u8; QK_K / 4];
        qh.copy_from_slice(&b[128..192]);
        let mut scales = [0i8; 16];
        for (s, &v) in scales.iter_mut().zip(&b[192..208]) {
            *s = v as i8;
        }
        BlockQ6K {
            ql,
            qh,
            scales,
            d: f16_at(b, 208),
        }
    }
}
