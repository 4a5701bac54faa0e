//! Portable, named randomness: xoshiro256++ (Blackman & Vigna, 2019) seeded through SplitMix64.
//!
//! There is no hidden generator state anywhere in the crate. Every random output row gets its own
//! stream, derived from `(seed, tag, key1, key2)` (for example the epoch and the user), so results
//! do not depend on how rows are split between threads, and a resumed run replays exactly.

/// Stream tags, one per kind of random draw, so that two kernels never share a stream.
pub const TAG_SHUFFLE: u64 = 0x5348_5546; // "SHUF"
pub const TAG_BUCKETS: u64 = 0x4255_434b; // "BUCK"
pub const TAG_TRAIN_NEG: u64 = 0x5452_4e47; // "TRNG"
pub const TAG_EVAL_NEG: u64 = 0x4556_4e47; // "EVNG"
pub const TAG_KMEANS: u64 = 0x4b4d_4e53; // "KMNS"

#[inline]
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// The stream named by a seed, a tag and two keys.
    pub fn stream(seed: u64, tag: u64, key1: u64, key2: u64) -> Self {
        // Hash the four words into one SplitMix64 state, each step mixing fully.
        let mut h = seed;
        let mut acc = splitmix64(&mut h);
        for w in [tag, key1, key2] {
            h = acc ^ w.wrapping_mul(0xd6e8_feb8_6659_fd93);
            acc = splitmix64(&mut h);
        }
        let mut st = acc;
        let s = [splitmix64(&mut st), splitmix64(&mut st), splitmix64(&mut st), splitmix64(&mut st)];
        Rng { s }
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform integer in `0..n` (n > 0), unbiased (Lemire's multiply-and-reject).
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        let mut m = (self.next_u64() as u128) * (n as u128);
        let mut lo = m as u64;
        if lo < n {
            let threshold = n.wrapping_neg() % n;
            while lo < threshold {
                m = (self.next_u64() as u128) * (n as u128);
                lo = m as u64;
            }
        }
        (m >> 64) as u64
    }

    /// Uniform float in [0, 1) with 53 random bits.
    #[inline]
    pub fn unit_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a: Vec<u64> = (0..4).map({ let mut r = Rng::stream(1, 2, 3, 4); move |_| r.next_u64() }).collect();
        let b: Vec<u64> = (0..4).map({ let mut r = Rng::stream(1, 2, 3, 4); move |_| r.next_u64() }).collect();
        let c: Vec<u64> = (0..4).map({ let mut r = Rng::stream(1, 2, 3, 5); move |_| r.next_u64() }).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn below_is_in_range_and_roughly_uniform() {
        let mut r = Rng::stream(7, 0, 0, 0);
        let mut counts = [0u32; 10];
        for _ in 0..100_000 {
            let v = r.below(10) as usize;
            counts[v] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn shuffle_is_a_permutation() {
        let mut v: Vec<u32> = (0..1000).collect();
        Rng::stream(3, 1, 1, 1).shuffle(&mut v);
        let mut s = v.clone();
        s.sort();
        assert_eq!(s, (0..1000).collect::<Vec<_>>());
        assert_ne!(v, s);
    }
}
