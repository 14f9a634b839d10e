//! The 32-element "legacy" formats (ggml-common.h `block_q8_0`, `block_q4_0`, `block_q5_0`,
//! `block_q5_1`), quantized as ggml's `quantize_row_*_ref`.
//!
//! | format | layout (bytes)                          | value                    |
//! |--------|-----------------------------------------|--------------------------|
//! | Q8_0   | d:f16, qs:[i8;32]                 = 34  | d * q                    |
//! | Q4_0   | d:f16, qs:[u8;16]                 = 18  | d * (q - 8),  q in 0..16 |
//! | Q5_0   | d:f16, qh:[u8;4], qs:[u8;16]      = 22  | d * (q - 16), q in 0..32 |
//! | Q5_1   | d:f16, m:f16, qh:[u8;4], qs:[u8;16] = 24 | d * q + m,    q in 0..32 |
//!
//! 4-bit packing: byte j holds element j in its low nibble and element j+16 in its high
//! nibble. Q5's fifth bits: bit j of the little-endian u32 `qh` is bit 4 of element j.
//!
//! Rounding: the quantizers compute `x * (1/d)` with the *unrounded* d (the stored fp16 d is
//! only used for dequantization), then Q8_0 rounds half away from zero (C `roundf`), while
//! Q4_0/Q5_0/Q5_1 add 8.5/16.5/0.5 and truncate toward zero (a C cast) — all in separate f32
//! operations (no FMA), which is what x86-64 builds of ggml do.

use super::math::{fp16, round_away};
use super::{Block, GgmlType};
use half::f16;

const QK: usize = 32;

fn f16_at(b: &[u8], i: usize) -> f16 {
    f16::from_le_bytes([b[i], b[i + 1]])
}

/// Element of largest magnitude, sign kept; the first one wins a tie (C: `if (amax < |v|)`).
fn signed_absmax(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// Splits 32 five-bit levels into 16 bytes of nibbles and the u32 of high bits.
fn pack_5bit(q: &[u8; QK]) -> ([u8; 16], [u8; 4]) {
    let mut qs = [0u8; 16];
    let mut qh = 0u32;
    for j in 0..16 {
        qs[j] = (q[j] & 0x0F) | ((q[j + 16] & 0x0F) << 4);
        qh |= ((q[j] as u32 & 0x10) >> 4) << j;
        qh |= ((q[j + 16] as u32 & 0x10) >> 4) << (j + 16);
    }
    (qs, qh.to_le_bytes())
}

/// The 5-bit level of element j (0..32).
fn level_5bit(qs: &[u8; 16], qh: &[u8; 4], j: usize) -> u8 {
    let h = u32::from_le_bytes(*qh);
    let lo = if j < 16 {
        qs[j] & 0x0F
    } else {
        qs[j - 16] >> 4
    };
    lo | ((((h >> j) & 1) as u8) << 4)
}

/// `block_q8_0`: symmetric 8-bit, d = max|x| / 127.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; QK],
}

impl Block for BlockQ8_0 {
    const TYPE: GgmlType = GgmlType::Q8_0;
    const QK: usize = QK;
    const SIZE: usize = 34;
    const F16_AT: &'static [usize] = &[0]; // d

    fn quantize(x: &[f32]) -> Self {
        // max|x| in 8 independent lanes (one chain through 32 values was the block's cost); a
        // NaN is passed over, as f32::max passes it over.
        let mut m = [0.0f32; 8];
        for c in x.chunks_exact(8) {
            for (m, &v) in m.iter_mut().zip(c) {
                let a = v.abs();
                *m = if a > *m { a } else { *m };
            }
        }
        let amax = m.iter().fold(0.0f32, |a, &b| if b > a { b } else { a });
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut qs = [0i8; QK];
        for (q, &v) in qs.iter_mut().zip(x) {
            // C roundf: half away from zero. |v*id| <= 127 (+ulp), fits i8.
            *q = round_away(v * id) as i8;
        }
        BlockQ8_0 { d: fp16(d), qs }
    }

    fn dequantize(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        for (o, &q) in y.iter_mut().zip(&self.qs) {
            *o = q as f32 * d;
        }
    }

    fn write(&self, out: &mut [u8]) {
        out[0..2].copy_from_slice(&self.d.to_le_bytes());
        for (o, &q) in out[2..34].iter_mut().zip(&self.qs) {
            *o = q as u8;
        }
    }

    fn read(b: &[u8]) -> Self {
        let mut qs = [0i8; QK];
        for (q, &v) in qs.iter_mut().zip(&b[2..34]) {
            *q = v as i8;
        }
        BlockQ8_0 {
            d: f16_at(b, 0),
            qs,
        }
    }
}

/// `block_q4_0`: d = max / -8 with `max` the signed element of largest magnitude, so that
/// element maps exactly to level 0 (value -8·d) and the positive side gets the 8..15 range.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; 16],
}

impl Block for BlockQ4_0 {
    const TYPE: GgmlType = GgmlType::Q4_0;
    const QK: usize = QK;
    const SIZE: usize = 18;
    const F16_AT: &'static [usize] = &[0]; // d

    fn quantize(x: &[f32]) -> Self {
        let max = signed_absmax(x);
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let level = |v: f32| -> u8 {
            // C: MIN(15, (int8_t)(v*id + 8.5f)); the sum is in [0.5, 16.5], so the cast truncates.
            ((v * id + 8.5) as i8).min(15) as u8
        };
        let mut qs = [0u8; 16];
        for j in 0..16 {
            qs[j] = level(x[j]) | (level(x[j + 16]) << 4);
        }
        BlockQ4_0 { d: fp16(d), qs }
    }

    fn dequantize(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        for j in 0..16 {
            y[j] = ((self.qs[j] & 0x0F) as i32 - 8) as f32 * d;
            y[j + 16] = ((self.qs[j] >> 4) as i32 - 8) as f32 * d;
        }
    }

    fn write(&self, out: &mut [u8]) {
        out[0..2].copy_from_slice(&self.d.to_le_bytes());
        out[2..18].copy_from_slice(&self.qs);
    }

    fn read(b: &[u8]) -> Self {
        let mut qs = [0u8; 16];
        qs.copy_from_slice(&b[2..18]);
        BlockQ4_0 {
            d: f16_at(b, 0),
            qs,
        }
    }
}

/// `block_q5_0`: Q4_0 with 5 bits: d = max / -16, level = MIN(31, trunc(v/d + 16.5)).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ5_0 {
    pub d: f16,
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}

impl Block for BlockQ5_0 {
    const TYPE: GgmlType = GgmlType::Q5_0;
    const QK: usize = QK;
    const SIZE: usize = 22;
    const F16_AT: &'static [usize] = &[0]; // d

    fn quantize(x: &[f32]) -> Self {
        let max = signed_absmax(x);
        let d = max / -16.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut q = [0u8; QK];
        for (l, &v) in q.iter_mut().zip(x) {
            *l = ((v * id + 16.5) as i8).min(31) as u8;
        }
        let (qs, qh) = pack_5bit(&q);
        BlockQ5_0 { d: fp16(d), qh, qs }
    }

    fn dequantize(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        for (j, o) in y.iter_mut().enumerate().take(QK) {
            *o = (level_5bit(&self.qs, &self.qh, j) as i32 - 16) as f32 * d;
        }
    }

    fn write(&self, out: &mut [u8]) {
        out[0..2].copy_from_slice(&self.d.to_le_bytes());
        out[2..6].copy_from_slice(&self.qh);
        out[6..22].copy_from_slice(&self.qs);
    }

    fn read(b: &[u8]) -> Self {
        let mut qh = [0u8; 4];
        qh.copy_from_slice(&b[2..6]);
        let mut qs = [0u8; 16];
        qs.copy_from_slice(&b[6..22]);
        BlockQ5_0 {
            d: f16_at(b, 0),
            qh,
            qs,
        }
    }
}

/// `block_q5_1`: asymmetric 5-bit: d = (max - min) / 31, m = min,
/// level = trunc((v - min)/d + 0.5) (no clamp in C: the largest value lands on 31).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ5_1 {
    pub d: f16,
    pub m: f16,
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}

impl Block for BlockQ5_1 {
    const TYPE: GgmlType = GgmlType::Q5_1;
    const QK: usize = QK;
    const SIZE: usize = 24;
    const F16_AT: &'static [usize] = &[0, 2]; // d, m

    fn quantize(x: &[f32]) -> Self {
        let (mut min, mut max) = (f32::MAX, -f32::MAX);
        for &v in x {
            if v < min {
                min = v;
            }
            if v > max {
                max = v;
            }
        }
        let d = (max - min) / 31.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut q = [0u8; QK];
        for (l, &v) in q.iter_mut().zip(x) {
            // C: (uint8_t)(x0 + 0.5f). `min(31)` never binds for finite input (it can only
            // guard against (max-min)*id rounding above 31.5, which 1/d cannot produce).
            *l = (((v - min) * id + 0.5) as u8).min(31);
        }
        let (qs, qh) = pack_5bit(&q);
        BlockQ5_1 {
            d: fp16(d),
            m: fp16(min),
            qh,
            qs,
        }
    }

    fn dequantize(&self, y: &mut [f32]) {
        let d = self.d.to_f32();
        let m = self.m.to_f32();
        for (j, o) in y.iter_mut().enumerate().take(QK) {
            *o = level_5bit(&self.qs, &self.qh, j) as f32 * d + m;
        }
    }

    fn write(&self, out: &mut [u8]) {
        out[0..2].copy_from_slice(&self.d.to_le_bytes());
        out[2..4].copy_from_slice(&self.m.to_le_bytes());
        out[4..8].copy_from_slice(&self.qh);
        out[8..24].copy_from_slice(&self.qs);
    }

    fn read(b: &[u8]) -> Self {
        let mut qh = [0u8; 4];
        qh.copy_from_slice(&b[4..8]);
        let mut qs = [0u8; 16];
        qs.copy_from_slice(&b[8..24]);
        BlockQ5_1 {
            d: f16_at(b, 0),
            m: f16_at(b, 2),
            qh,
            qs,
        }
    }
}
