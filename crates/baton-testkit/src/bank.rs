//! Helpers of the STM bank tests (`tests/stm_*.rs`): account balances stored as decimal
//! text, and a small deterministic random source for picking transfers.

/// An account's balance: the value as a decimal number, 0 if absent or not a number.
pub fn number(v: Option<Vec<u8>>) -> i64 {
    v.and_then(|v| String::from_utf8(v).ok()?.parse().ok())
        .unwrap_or(0)
}

/// A xorshift random source, seeded by the caller (the same seed, the same transfers).
#[derive(Debug)]
pub struct Rng(pub u64);

impl Rng {
    /// A number below `n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}
