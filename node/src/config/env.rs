//! Values from the environment in a config file's text, before it is parsed:
//! `${NAME}` and `${NAME:-default}`.

use anyhow::{Result, anyhow, bail};

/// Expands `${NAME}` and `${NAME:-default}` from `env` in a config file's
/// text, outside comment lines; `$$` is a literal `$`. An unset variable
/// without a default is an error naming it and its line.
pub fn interpolate(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<String> {
    let mut out = String::with_capacity(text.len());
    for (n, line) in text.split_inclusive('\n').enumerate() {
        if line.trim_start().starts_with('#') {
            out.push_str(line);
            continue;
        }
        let mut rest = line;
        while let Some(i) = rest.find('$') {
            out.push_str(&rest[..i]);
            let after = &rest[i + 1..];
            if let Some(tail) = after.strip_prefix('$') {
                out.push('$');
                rest = tail;
                continue;
            }
            let Some(body) = after.strip_prefix('{') else {
                out.push('$');
                rest = after;
                continue;
            };
            let end = body
                .find('}')
                .ok_or_else(|| anyhow!("line {}: `${{` without a closing `}}`", n + 1))?;
            let (name, default) = match body[..end].split_once(":-") {
                Some((name, d)) => (name, Some(d)),
                None => (&body[..end], None),
            };
            let valid = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                bail!(
                    "line {}: `${{{}}}` is not an environment variable name",
                    n + 1,
                    name
                );
            }
            match (env(name), default) {
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => bail!(
                    "line {}: environment variable {name} is not set (write ${{{name}:-DEFAULT}} for a default)",
                    n + 1
                ),
            }
            rest = &body[end + 1..];
        }
        out.push_str(rest);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::env;

    #[test]
    fn interpolation_fills_defaults_and_names_what_is_missing() {
        let e = env(&[("J", "DE"), ("EMPTY", "")]);
        let out = interpolate(
            "a = \"${J}\"\nb = ${N:-3}\nc = \"${EMPTY:-x}\"\n# ${NOPE}\nd = \"$$ $x\"\n",
            &e,
        )
        .unwrap();
        assert_eq!(
            out,
            "a = \"DE\"\nb = 3\nc = \"\"\n# ${NOPE}\nd = \"$ $x\"\n"
        );
        let err = interpolate("a = 1\nb = \"${MISSING}\"\n", &e).unwrap_err();
        assert!(
            err.to_string()
                .contains("line 2: environment variable MISSING is not set"),
            "{err}"
        );
        let err = interpolate("b = \"${OPEN\"\n", &e).unwrap_err();
        assert!(err.to_string().contains("without a closing"), "{err}");
        let err = interpolate("b = \"${1X}\"\n", &e).unwrap_err();
        assert!(
            err.to_string().contains("not an environment variable name"),
            "{err}"
        );
    }
}
