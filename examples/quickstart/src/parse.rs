pub fn parse_line(line: &str) -> Option<(u32, u64)> {
    let mut parts = line.splitn(2, ',');
    let number = parts.next()?.trim().parse().ok()?;
    let count = if let Some(c) = parts.next() { c.trim().parse().ok()? } else { 0 };
    let pair = (number, count);
    Some(pair)
}
pub fn is_end(line: &str) -> bool {
    let trimmed = line.trim();
    trimmed == "end_of_record"
}
