//! The one rule that tests, benchmarks and the CLI's tests follow when something they need is
//! missing (not part of the library's API): outside CI they say loudly that they are SKIPPED
//! (which never counts as a pass); with `CI` set to `true` (or `1`) a missing adapter or tool
//! is a failure.

use crate::context::Engine;

/// Whether this is a CI run (`CI=true` or `CI=1`): there, nothing may be skipped.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// `Some(())` when `missing` is `None`; otherwise, in CI, a panic that names what `what` needs
/// and why it is missing; elsewhere a loud SKIPPED line and `None`.
pub fn require(what: &str, missing: Option<String>) -> Option<()> {
    match missing {
        None => Some(()),
        Some(why) if in_ci() => panic!("CI is set, so {what} may not be skipped: {why}"),
        Some(why) => {
            eprintln!("SKIPPED (not a pass) {what}: {why}");
            None
        }
    }
}

/// An engine on the default adapter (`WGPU_BACKEND`, `WGPU_ADAPTER_NAME`), or the rule above
/// when there is none.
pub fn engine_or_skip(what: &str) -> Option<Engine> {
    match Engine::new() {
        Ok(e) => Some(e),
        Err(e) => require(what, Some(format!("no GPU adapter ({e})"))).and(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nothing missing passes; something missing fails under CI and is skipped (None) outside.
    #[test]
    fn missing_things_fail_in_ci_and_skip_loudly_elsewhere() {
        assert_eq!(require("x", None), Some(()));
        let got = std::panic::catch_unwind(|| require("x", Some("gone".into())));
        if in_ci() {
            let e = got.expect_err("CI must fail on a missing requirement");
            let msg = e.downcast_ref::<String>().cloned().unwrap_or_default();
            assert!(
                msg.contains("may not be skipped") && msg.contains("gone"),
                "{msg}"
            );
        } else {
            assert_eq!(got.expect("outside CI it does not panic"), None);
        }
    }
}
