//! The quickstart's demo crate: the sources its two coverage files were recorded against.
pub mod parse;
pub fn add(a: i64, b: i64) -> i64 {
    let sum = a + b;
    sum
}

pub fn divide(a: i64, b: i64) -> Option<i64> {
    if b == 0 {
        return None;
    }
    let quotient = a / b;
    Some(quotient)
}
