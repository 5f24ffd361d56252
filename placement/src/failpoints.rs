//! Failpoints of placement (issue 14, ADR 0029), compiled in only with the cargo feature
//! `failpoints` (TiKV's `fail` crate; off by default, on in `scripts/test.sh`'s build).
//! `FAILPOINTS=name=action;...` is applied at start; without the feature a set `FAILPOINTS`
//! fails the start. Crash points exit the process on the spot (status 86) with any action
//! that returns.

/// Before the range-map transaction of a split (an update of more than one descriptor: both
/// halves) is sent to the metastore.
pub const BEFORE_SPLIT_TXN: &str = "placement::range_map::before_split_txn";
/// After the range-map transaction of a split succeeded, before anybody is told.
pub const AFTER_SPLIT_TXN: &str = "placement::range_map::after_split_txn";

/// Exit status of a process stopped by a crash point (as the storenode's).
pub const EXIT_CRASH_POINT: i32 = 86;

/// A crash point (see the module doc); a no-op without the `failpoints` feature.
#[macro_export]
macro_rules! crash_point {
    ($name:expr) => {
        #[cfg(feature = "failpoints")]
        {
            if fail::eval($name, |_| ()).is_some() {
                $crate::failpoints::crash($name)
            }
        }
    };
}

/// Exits at crash point `name`.
pub fn crash(name: &str) -> ! {
    eprintln!("skv-placement: crash point {name} reached: exiting");
    std::process::exit(EXIT_CRASH_POINT)
}

/// Errors of `FAILPOINTS`.
#[derive(Debug, thiserror::Error)]
pub enum FailpointError {
    #[error("FAILPOINTS is set but this binary was built without the `failpoints` feature")]
    NotCompiledIn,
    #[error("FAILPOINTS entry {0:?} is not name=action")]
    Syntax(String),
    #[error("failpoint {name}: bad action {action:?}: {reason}")]
    Action {
        name: String,
        action: String,
        reason: String,
    },
}

/// Splits a `FAILPOINTS` value into (name, action) pairs; pure.
pub fn parse_spec(spec: &str) -> Result<Vec<(String, String)>, FailpointError> {
    let mut out = Vec::new();
    for part in spec.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('=') {
            Some((n, a)) if !n.trim().is_empty() && !a.trim().is_empty() => {
                out.push((n.trim().to_string(), a.trim().to_string()))
            }
            _ => return Err(FailpointError::Syntax(part.to_string())),
        }
    }
    Ok(out)
}

/// Applies `FAILPOINTS` from the environment (once, at start).
pub fn setup_from_env() -> Result<(), FailpointError> {
    let Ok(spec) = std::env::var("FAILPOINTS") else {
        return Ok(());
    };
    let points = parse_spec(&spec)?;
    if points.is_empty() {
        return Ok(());
    }
    if !cfg!(feature = "failpoints") {
        return Err(FailpointError::NotCompiledIn);
    }
    for (name, action) in points {
        fail::cfg(name.as_str(), &action).map_err(|reason| FailpointError::Action {
            name: name.clone(),
            action: action.clone(),
            reason,
        })?;
        tracing::warn!(failpoint = %name, %action, "failpoint set from FAILPOINTS");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_are_refused() {
        assert_eq!(
            parse_spec(" a=return ;b=1*return").unwrap(),
            vec![
                ("a".to_string(), "return".to_string()),
                ("b".to_string(), "1*return".to_string())
            ]
        );
        assert!(matches!(parse_spec("a"), Err(FailpointError::Syntax(_))));
        assert!(matches!(parse_spec("a= "), Err(FailpointError::Syntax(_))));
    }
}
