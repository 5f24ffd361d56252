//! What the servers' failpoints share (ADR 0029): the `FAILPOINTS` syntax, its errors, and
//! the exit of a crash point. Each server keeps its failpoint names and its `crash_point!`
//! macro (the `failpoints` feature is the server crate's: a binary built without it refuses
//! a `FAILPOINTS` value instead of ignoring it).

/// Exit status of a process stopped by a crash point.
pub const EXIT_CRASH_POINT: i32 = 86;

/// Exits on the spot at crash point `name`: no destructors, nothing flushed of the process's
/// own — what `kill -9` does, at a chosen instruction.
pub fn crash(process: &str, name: &str) -> ! {
    eprintln!("{process}: crash point {name} reached: exiting");
    std::process::exit(EXIT_CRASH_POINT)
}

/// Errors of the failpoint configuration.
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
        let Some((name, action)) = part.split_once('=') else {
            return Err(FailpointError::Syntax(part.to_string()));
        };
        let (name, action) = (name.trim(), action.trim());
        if name.is_empty() || action.is_empty() {
            return Err(FailpointError::Syntax(part.to_string()));
        }
        out.push((name.to_string(), action.to_string()));
    }
    Ok(out)
}

/// Sets one failpoint (effective only in a binary whose `fail` has its `failpoints`
/// feature; callers check that first).
pub fn set(name: &str, action: &str) -> Result<(), FailpointError> {
    fail::cfg(name, action).map_err(|reason| FailpointError::Action {
        name: name.to_string(),
        action: action.to_string(),
        reason,
    })
}

/// Applies a `FAILPOINTS` value: refused whole by a binary without failpoints
/// (`compiled_in` is the calling server's `cfg!(feature = "failpoints")`), an empty one is
/// nothing to do.
pub fn apply_spec(spec: &str, compiled_in: bool) -> Result<(), FailpointError> {
    let points = parse_spec(spec)?;
    if points.is_empty() {
        return Ok(());
    }
    if !compiled_in {
        return Err(FailpointError::NotCompiledIn);
    }
    for (name, action) in points {
        set(&name, &action)?;
        tracing::warn!(failpoint = %name, %action, "failpoint set from FAILPOINTS");
    }
    Ok(())
}

/// Applies `FAILPOINTS` from the environment (once, at start).
pub fn setup_from_env(compiled_in: bool) -> Result<(), FailpointError> {
    match std::env::var("FAILPOINTS") {
        Ok(spec) => apply_spec(&spec, compiled_in),
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_are_refused() {
        assert_eq!(
            parse_spec("a::b=return; c=50%panic(x) ;").unwrap(),
            vec![
                ("a::b".to_string(), "return".to_string()),
                ("c".to_string(), "50%panic(x)".to_string())
            ]
        );
        assert!(parse_spec("").unwrap().is_empty());
        assert!(matches!(parse_spec("nameonly"), Err(FailpointError::Syntax(_))));
        assert!(matches!(parse_spec("=return"), Err(FailpointError::Syntax(_))));
        assert!(matches!(parse_spec("a="), Err(FailpointError::Syntax(_))));
        assert!(matches!(parse_spec("a= "), Err(FailpointError::Syntax(_))));
    }

    #[test]
    fn without_failpoints_compiled_in_a_spec_is_refused_not_ignored() {
        assert!(matches!(
            apply_spec("x=return", false),
            Err(FailpointError::NotCompiledIn)
        ));
        assert!(apply_spec(" ; ", false).is_ok());
    }

    #[test]
    fn a_bad_action_is_refused() {
        assert!(matches!(
            apply_spec("skv::test::unused=notanaction", true),
            Err(FailpointError::Action { .. })
        ));
    }
}
