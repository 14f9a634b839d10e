//! Two forwards side by side that share the products they provably have in common.
//!
//! verify runs the artefact forward and the expected forward on the same device. Wherever the
//! artefact's tensors were proven equal to their re-derivation, the expected model reads the very
//! same mapped bytes, and as long as the two residual streams agree bit for bit, both sides ask
//! for the same product: the same stored weight, the same input, the same bias. A product is a
//! deterministic function of those (the kernels' results depend neither on the thread count nor
//! on where a row sits: `quant::dot` and `quant::float_dot` test it), so the second side can take
//! the first side's result instead of computing it again, and every value it then holds is the
//! one it would have computed. Products that differ in any bit of any operand (the expected
//! model's Q/K rows, which it holds in the checkpoint's order; anything after the first
//! difference, which then flows on) are computed by each side, so a fault shows exactly as it
//! would without sharing.
//!
//! How: each side runs its own model code (its weights, hyper-parameters and rope) in its own
//! thread, behind a [`Paired`] backend. The leader (the artefact side) computes every
//! `linear_from` and publishes it, in call order, into a short queue; the follower, at its n-th
//! `linear_from`, takes the n-th from the queue (one published and one taken per call, so the
//! queue's front is always it) and uses that product if the weight's stored bytes are the same place
//! (`WeightSource::stored_at`) and the input and bias are equal bit for bit, and otherwise computes
//! its own. The queue is bounded (the leader waits for the follower), so memory stays at a few
//! products. When either side stops (done, error or panic) the other goes on alone.
use super::backend::{with_f32, Backend, KvType};
use super::weights::{StoredAt, WeightSource};
use crate::ground::error::Result;
use candle_core::Tensor;
use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};

/// Products the leader may be ahead of the follower by (each holds an input and an output: at
/// 7B and 773 positions at most 2 x 34 MB).
const AHEAD: usize = 4;

/// One published product: the call's operands (what the follower compares) and its result.
struct Product<T> {
    /// The weight's name and where its stored bytes lie (None: not shareable).
    weight: Option<(String, StoredAt)>,
    x: T,
    bias: Option<T>,
    y: T,
}

struct State<T> {
    /// The leader's products the follower has not reached yet, in call order.
    queue: VecDeque<Product<T>>,
    leader_done: bool,
    follower_done: bool,
    sharing: Sharing,
}

/// What the two sides share, one per pair of forwards ([`run`]).
struct Exchange<T> {
    state: Mutex<State<T>>,
    changed: Condvar,
}

/// How many of the follower's products were taken from the leader, and how many it computed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Sharing {
    pub shared: usize,
    pub computed: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Leader,
    Follower,
}

/// A backend for one side of a pair: `B`'s ops, with `linear_from` published (leader) or taken
/// when it is the same product (follower).
pub struct Paired<'a, B: Backend + ?Sized> {
    inner: &'a B,
    ex: &'a Exchange<B::T>,
    role: Role,
}

/// Marks the side finished when dropped (also on an error or a panic), so the other never waits
/// for it.
struct Done<'a, T> {
    ex: &'a Exchange<T>,
    role: Role,
}

impl<T> Drop for Done<'_, T> {
    fn drop(&mut self) {
        let mut s = self.ex.state();
        match self.role {
            Role::Leader => s.leader_done = true,
            Role::Follower => {
                s.follower_done = true;
                s.queue.clear();
            }
        }
        self.ex.changed.notify_all();
    }
}

/// Run `leader` and `follower` side by side (the leader in a new thread), each on its own
/// [`Paired`] view of `b`; returns both results and what the follower shared.
pub fn run<B, RL, RF>(
    b: &B,
    leader: impl FnOnce(&Paired<B>) -> RL + Send,
    follower: impl FnOnce(&Paired<B>) -> RF,
) -> (RL, RF, Sharing)
where
    B: Backend + Sync + ?Sized,
    B::T: Send + Sync,
    RL: Send,
{
    let ex = Exchange {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            leader_done: false,
            follower_done: false,
            sharing: Sharing::default(),
        }),
        changed: Condvar::new(),
    };
    let side = |role| Paired {
        inner: b,
        ex: &ex,
        role,
    };
    let (rl, rf) = std::thread::scope(|s| {
        let h = s.spawn(|| {
            let _done = Done {
                ex: &ex,
                role: Role::Leader,
            };
            leader(&side(Role::Leader))
        });
        let rf = {
            let _done = Done {
                ex: &ex,
                role: Role::Follower,
            };
            follower(&side(Role::Follower))
        };
        let rl = h.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        (rl, rf)
    });
    let sharing = ex.state().sharing;
    (rl, rf, sharing)
}

impl<T> Exchange<T> {
    /// The shared state (a side that panicked holding it left it consistent: every change is
    /// one push, pop or count).
    fn state(&self) -> std::sync::MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The shared state once `until` holds of it (woken by every change the other side makes).
    fn state_when(&self, until: impl Fn(&State<T>) -> bool) -> std::sync::MutexGuard<'_, State<T>> {
        self.changed
            .wait_while(self.state(), |s| !until(s))
            .unwrap_or_else(|p| p.into_inner())
    }
}

impl<B: Backend + ?Sized> Paired<'_, B> {
    /// Whether two activations hold the same values bit for bit (NaN included, -0 != +0).
    fn same_bits(&self, a: &B::T, b: &B::T) -> Result<bool> {
        if self.inner.dims(a) != self.inner.dims(b) {
            return Ok(false);
        }
        let (a, b) = (self.inner.download(a)?, self.inner.download(b)?);
        with_f32(&a, |a| {
            with_f32(&b, |b| {
                bytemuck::cast_slice::<f32, u8>(a) == bytemuck::cast_slice::<f32, u8>(b)
            })
        })?
    }

    fn same_bias(&self, a: Option<&B::T>, b: Option<&B::T>) -> Result<bool> {
        match (a, b) {
            (None, None) => Ok(true),
            (Some(a), Some(b)) => self.same_bits(a, b),
            _ => Ok(false),
        }
    }

    /// The leader's product `p` as this side's, if it is the same computation: the same weight
    /// (name and stored bytes; this side's rows may be those bytes' rows in another order, when
    /// the leader's are in order), the same input and bias bit for bit. With rows moved, each
    /// output column moves with its row (a product's column depends only on its weight row:
    /// the CPU kernels' results do not depend on where a row sits), so no bias is allowed then.
    fn same_product(
        &self,
        p: Product<B::T>,
        name: &str,
        mine: &StoredAt,
        x: &B::T,
        bias: Option<&B::T>,
    ) -> Result<Option<B::T>> {
        let Some((their_name, theirs)) = &p.weight else {
            return Ok(None);
        };
        if their_name != name
            || theirs.bytes != mine.bytes
            || theirs.rows.is_some()
            || !self.same_bits(&p.x, x)?
            || !self.same_bias(p.bias.as_ref(), bias)?
        {
            return Ok(None);
        }
        let Some(order) = &mine.rows else {
            return Ok(Some(p.y));
        };
        let (n, out) = self.inner.dims(&p.y);
        if bias.is_some() || order.len() != out {
            return Ok(None);
        }
        let y = self.inner.download(&p.y)?;
        let moved = with_f32(&y, |y| {
            let mut m = vec![0f32; n * out];
            for (src, dst) in y.chunks_exact(out).zip(m.chunks_exact_mut(out)) {
                for (i, &to) in order.iter().enumerate() {
                    dst[to] = src[i];
                }
            }
            m
        })?;
        let t = Tensor::from_vec(moved, (n, out), &candle_core::Device::Cpu)?;
        Ok(Some(self.inner.upload(&t)?))
    }

    fn lead(
        &self,
        ws: &dyn WeightSource,
        name: &str,
        x: &B::T,
        bias: Option<&B::T>,
    ) -> Result<B::T> {
        let weight = ws.stored_at(name).map(|at| (name.to_string(), at));
        let y = self.inner.linear_from(ws, name, x, bias)?;
        let mut s = self
            .ex
            .state_when(|s| s.queue.len() < AHEAD || s.follower_done);
        if !s.follower_done {
            s.queue.push_back(Product {
                weight,
                x: x.clone(),
                bias: bias.cloned(),
                y: y.clone(),
            });
            self.ex.changed.notify_all();
        }
        Ok(y)
    }

    fn follow(
        &self,
        ws: &dyn WeightSource,
        name: &str,
        x: &B::T,
        bias: Option<&B::T>,
    ) -> Result<B::T> {
        // The leader's product of this same call (None once it has stopped short of it).
        let theirs = {
            let mut s = self.ex.state_when(|s| !s.queue.is_empty() || s.leader_done);
            let p = s.queue.pop_front();
            self.ex.changed.notify_all();
            p
        };
        if let (Some(p), Some(mine)) = (theirs, ws.stored_at(name)) {
            if let Some(y) = self.same_product(p, name, &mine, x, bias)? {
                self.ex.state().sharing.shared += 1;
                return Ok(y);
            }
        }
        let y = self.inner.linear_from(ws, name, x, bias)?;
        self.ex.state().sharing.computed += 1;
        Ok(y)
    }
}

impl<B: Backend + ?Sized> Backend for Paired<'_, B> {
    type T = B::T;
    type W = B::W;

    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn upload(&self, x: &Tensor) -> Result<B::T> {
        self.inner.upload(x)
    }
    fn download(&self, x: &B::T) -> Result<Tensor> {
        self.inner.download(x)
    }
    fn dims(&self, x: &B::T) -> (usize, usize) {
        self.inner.dims(x)
    }
    fn weight(&self, ws: &dyn WeightSource, name: &str) -> Result<B::W> {
        self.inner.weight(ws, name)
    }
    fn weight_dims(&self, w: &B::W) -> (usize, usize) {
        self.inner.weight_dims(w)
    }
    fn param(&self, ws: &dyn WeightSource, name: &str) -> Result<B::T> {
        self.inner.param(ws, name)
    }
    fn linear(&self, x: &B::T, w: &B::W, bias: Option<&B::T>) -> Result<B::T> {
        self.inner.linear(x, w, bias)
    }
    /// The one op shared: see the module docs.
    fn linear_from(
        &self,
        ws: &dyn WeightSource,
        name: &str,
        x: &B::T,
        bias: Option<&B::T>,
    ) -> Result<B::T> {
        match self.role {
            Role::Leader => self.lead(ws, name, x, bias),
            Role::Follower => self.follow(ws, name, x, bias),
        }
    }
    fn attention(
        &self,
        q: &B::T,
        k: &B::T,
        v: &B::T,
        n_head: usize,
        n_head_kv: usize,
        causal: bool,
    ) -> Result<B::T> {
        self.inner.attention(q, k, v, n_head, n_head_kv, causal)
    }
    fn layer_norm(&self, x: &B::T, w: &B::T, b: &B::T, eps: f32) -> Result<B::T> {
        self.inner.layer_norm(x, w, b, eps)
    }
    fn rms_norm(&self, x: &B::T, w: &B::T, eps: f32) -> Result<B::T> {
        self.inner.rms_norm(x, w, eps)
    }
    fn softmax_groups(&self, x: &B::T, group: usize) -> Result<B::T> {
        self.inner.softmax_groups(x, group)
    }
    fn add(&self, a: &B::T, b: &B::T) -> Result<B::T> {
        self.inner.add(a, b)
    }
    fn mul(&self, a: &B::T, b: &B::T) -> Result<B::T> {
        self.inner.mul(a, b)
    }
    fn quick_gelu(&self, x: &B::T) -> Result<B::T> {
        self.inner.quick_gelu(x)
    }
    fn gelu_erf(&self, x: &B::T) -> Result<B::T> {
        self.inner.gelu_erf(x)
    }
    fn silu_mul(&self, gate: &B::T, up: &B::T) -> Result<B::T> {
        self.inner.silu_mul(gate, up)
    }
    fn rope_interleaved(&self, x: &B::T, n_head: usize, pos0: usize, theta: f32) -> Result<B::T> {
        self.inner.rope_interleaved(x, n_head, pos0, theta)
    }
    fn rope_neox(&self, x: &B::T, n_head: usize, pos0: usize, theta: f32) -> Result<B::T> {
        self.inner.rope_neox(x, n_head, pos0, theta)
    }
    fn msda(
        &self,
        value: &B::T,
        levels: &[(usize, usize)],
        offsets: &B::T,
        weights: &B::T,
        ref_grid: (usize, usize),
        n_heads: usize,
        n_points: usize,
    ) -> Result<B::T> {
        self.inner
            .msda(value, levels, offsets, weights, ref_grid, n_heads, n_points)
    }
    fn rows(&self, x: &B::T, start: usize, len: usize) -> Result<B::T> {
        self.inner.rows(x, start, len)
    }
    fn concat_rows(&self, xs: &[&B::T]) -> Result<B::T> {
        self.inner.concat_rows(xs)
    }
    fn kv_append(&self, cache: Option<(B::T, usize)>, new: &B::T, ty: KvType) -> Result<B::T> {
        self.inner.kv_append(cache, new, ty)
    }
    fn kv_view(&self, cache: &B::T, used: usize) -> Result<B::T> {
        self.inner.kv_view(cache, used)
    }
    fn sync(&self) -> Result<()> {
        self.inner.sync()
    }
    fn linear_label(&self, x: &B::T, w: &B::W) -> String {
        self.inner.linear_label(x, w)
    }
    fn linear_from_label(&self, ws: &dyn WeightSource, name: &str, x: &B::T) -> String {
        self.inner.linear_from_label(ws, name, x)
    }
    fn attention_label(&self, q: &B::T, k: &B::T, n_head: usize) -> String {
        self.inner.attention_label(q, k, n_head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::CpuBackend;
    use crate::model::testutil::Rng;
    use crate::model::MemWeights;
    use crate::quant::GgmlType;
    use candle_core::Device;

    const K: usize = 64;

    /// Weights w0..w9, each [K, K]: w0..w4 Q8_0, the rest f32 (both roads of the CPU's product).
    fn weights() -> MemWeights {
        let mut ws = MemWeights::new();
        let mut rng = Rng::new(3);
        for i in 0..10 {
            let v = rng.vec(K * K, 0.2);
            if i < 5 {
                let bytes = crate::quant::quantize(GgmlType::Q8_0, &v).unwrap();
                ws.tensors
                    .insert(format!("w{i}"), (GgmlType::Q8_0, vec![K, K], bytes));
            } else {
                ws.insert_f32(&format!("w{i}"), &[K, K], &v);
            }
        }
        ws
    }

    fn input(seed: u64) -> Tensor {
        Tensor::from_vec(Rng::new(seed).vec(5 * K, 1.0), (5, K), &Device::Cpu).unwrap()
    }

    /// x through the named weights one after the other (each output the next input).
    fn chain<B: Backend>(b: &B, ws: &dyn WeightSource, names: &[&str], x: &B::T) -> Result<B::T> {
        let mut x = x.clone();
        for n in names {
            x = b.linear_from(ws, n, &x, None)?;
        }
        Ok(x)
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }

    const ALL: [&str; 10] = ["w0", "w1", "w2", "w3", "w4", "w5", "w6", "w7", "w8", "w9"];

    /// The same calls on both sides: all shared, and each side's result is what it computes alone.
    #[test]
    fn same_products_are_shared_and_equal() {
        let ws = weights();
        let x = input(1);
        let alone = chain(&CpuBackend, &ws, &ALL, &x).unwrap();
        let (a, f, sh) = run(
            &CpuBackend,
            |b| chain(b, &ws, &ALL, &x),
            |b| chain(b, &ws, &ALL, &x),
        );
        assert_eq!(bits(&a.unwrap()), bits(&alone));
        assert_eq!(bits(&f.unwrap()), bits(&alone));
        assert_eq!(
            sh,
            Sharing {
                shared: 10,
                computed: 0
            }
        );
    }

    /// A follower whose input, weight or bias differs computes, from there on; its results are
    /// those it computes alone.
    #[test]
    fn differing_operands_are_computed() {
        let ws = weights();
        let other = weights(); // the same values at other addresses: not the same place
        let (x, y) = (input(1), input(2));
        // Another input: nothing shared.
        let (_, f, sh) = run(
            &CpuBackend,
            |b| chain(b, &ws, &ALL, &x),
            |b| chain(b, &ws, &ALL, &y),
        );
        assert_eq!(
            bits(&f.unwrap()),
            bits(&chain(&CpuBackend, &ws, &ALL, &y).unwrap())
        );
        assert_eq!((sh.shared, sh.computed), (0, 10));
        // One weight from elsewhere (same values): that product and the rest computed.
        let (_, f, sh) = run(
            &CpuBackend,
            |b| chain(b, &ws, &ALL, &x),
            |b| {
                let h = chain(b, &ws, &ALL[..3], &x)?;
                let h = b.linear_from(&other, "w3", &h, None)?;
                chain(b, &ws, &ALL[4..], &h)
            },
        );
        assert_eq!(
            bits(&f.unwrap()),
            bits(&chain(&CpuBackend, &ws, &ALL, &x).unwrap())
        );
        // Its output has the same bits (same values), so the products after it are shared again.
        assert_eq!((sh.shared, sh.computed), (9, 1));
        // Another bias (and no bias on the leader's side) is not the same product.
        let bias = Tensor::from_vec(vec![0.5f32; K], (1, K), &Device::Cpu).unwrap();
        let (_, f, sh) = run(
            &CpuBackend,
            |b| chain(b, &ws, &ALL[..2], &x),
            |b| {
                let h = b.linear_from(&ws, "w0", &x, Some(&bias))?;
                b.linear_from(&ws, "w1", &h, None)
            },
        );
        let want = CpuBackend
            .linear_from(
                &ws,
                "w1",
                &CpuBackend.linear_from(&ws, "w0", &x, Some(&bias)).unwrap(),
                None,
            )
            .unwrap();
        assert_eq!(bits(&f.unwrap()), bits(&want));
        assert_eq!((sh.shared, sh.computed), (0, 2));
    }

    /// A weight source whose `w0` is `inner`'s with rows moved (row i to row order[i]), saying so
    /// in `stored_at`, as verify's expected model does for the Q/K tensors it puts back in order.
    struct Moved<'a> {
        inner: &'a MemWeights,
        order: Vec<usize>,
        say_moved: bool,
    }

    impl WeightSource for Moved<'_> {
        fn raw(&self, name: &str) -> Result<crate::model::RawTensor<'_>> {
            let t = self.inner.raw(name)?;
            if name != "w0" {
                return Ok(t);
            }
            let row = t.data.len() / self.order.len();
            let mut data = vec![0u8; t.data.len()];
            for (i, &to) in self.order.iter().enumerate() {
                data[to * row..(to + 1) * row].copy_from_slice(&t.data[i * row..(i + 1) * row]);
            }
            Ok(crate::model::RawTensor {
                ty: t.ty,
                shape: t.shape.clone(),
                data: data.into(),
            })
        }
        fn has(&self, name: &str) -> bool {
            self.inner.has(name)
        }
        fn stored_at(&self, name: &str) -> Option<StoredAt> {
            let at = self.inner.stored_at(name)?;
            Some(if name == "w0" && self.say_moved {
                StoredAt {
                    rows: Some(self.order.clone()),
                    ..at
                }
            } else {
                at
            })
        }
    }

    /// A follower whose weight is the leader's with rows moved takes the leader's product with
    /// its columns moved alike: the bits it computes alone. Saying the rows are in order when
    /// they are not would share a wrong product: the test sees that (so it can fail).
    #[test]
    fn moved_rows_share_moved_columns() {
        let ws = weights();
        let x = input(1);
        let order: Vec<usize> = (0..K).map(|i| (i * 5 + 3) % K).collect();
        for say_moved in [true, false] {
            let moved = Moved {
                inner: &ws,
                order: order.clone(),
                say_moved,
            };
            let alone = chain(&CpuBackend, &moved, &ALL[..1], &x).unwrap();
            let (_, f, sh) = run(
                &CpuBackend,
                |b| chain(b, &ws, &ALL[..1], &x),
                |b| chain(b, &moved, &ALL[..1], &x),
            );
            assert_eq!(sh.shared, 1);
            assert_eq!(bits(&f.unwrap()) == bits(&alone), say_moved);
        }
    }

    /// A side that stops early (an error, fewer calls) never leaves the other waiting, in either
    /// role and even past the queue's bound; each side's result is its own.
    #[test]
    fn a_side_that_stops_leaves_the_other_free() {
        let ws = weights();
        let x = input(1);
        let want = bits(&chain(&CpuBackend, &ws, &ALL, &x).unwrap());
        // The leader fails at its first call: the follower computes everything.
        let (a, f, sh) = run(
            &CpuBackend,
            |b| chain(b, &ws, &["missing"], &x),
            |b| chain(b, &ws, &ALL, &x),
        );
        assert!(a.is_err());
        assert_eq!(bits(&f.unwrap()), want);
        assert_eq!((sh.shared, sh.computed), (0, 10));
        // The follower fails at once: the leader publishes more than AHEAD products unhindered.
        let (a, f, _) = run(
            &CpuBackend,
            |b| chain(b, &ws, &ALL, &x),
            |b| chain(b, &ws, &["missing"], &x),
        );
        assert!(f.is_err());
        assert_eq!(bits(&a.unwrap()), want);
        // The leader makes fewer calls than the follower, and the other way round.
        let (_, f, sh) = run(
            &CpuBackend,
            |b| chain(b, &ws, &ALL[..2], &x),
            |b| chain(b, &ws, &ALL, &x),
        );
        assert_eq!(bits(&f.unwrap()), want);
        assert_eq!((sh.shared, sh.computed), (2, 8));
        let (a, _, sh) = run(
            &CpuBackend,
            |b| chain(b, &ws, &ALL, &x),
            |b| chain(b, &ws, &ALL[..2], &x),
        );
        assert_eq!(bits(&a.unwrap()), want);
        assert_eq!((sh.shared, sh.computed), (2, 0));
        // A panicking follower: the panic reaches the caller, the leader is not left blocked.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run(
                &CpuBackend,
                |b| chain(b, &ws, &ALL, &x),
                |_: &Paired<CpuBackend>| -> Result<Tensor> { panic!("follower") },
            )
        }));
        assert!(r.is_err());
    }
}
