//! Exit codes: one per kind of failure a script may act on differently (README, "Exit codes").
//! The mapping lives in `rime_core::error` (hooks get the same codes in `RIME_ERROR`).

pub fn code(e: &anyhow::Error) -> i32 {
    rime_core::error::exit_code(e)
}
