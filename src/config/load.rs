//! Loading: TOML text, then `IMGATE__SECTION__KEY` overrides from an injected environment,
//! then serde with errors that name the dotted key.

use std::path::Path;

use super::{invalid, Config, ConfigError};

const ENV_PREFIX: &str = "IMGATE__";

impl Config {
    /// Load a file (or the embedded default when `path` is None), then apply `IMGATE__…`
    /// overrides from `env` (pass `std::env::vars()`).
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.display().to_string(),
                source,
            })?,
            None => return Config::from_toml_str("", env),
        };
        Config::parse(&text, env, true)
    }

    /// Parse TOML text (empty: every default) with environment overrides applied.
    pub fn from_toml_str(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        Config::parse(text, env, false)
    }

    /// A file must name its profile (SPEC §9): one that leaves it out would otherwise run
    /// the dev profile, with `/dev/token` signing the file's real secret and `dev-key`
    /// accepted. `IMGATE__PROFILE` counts as declaring it.
    fn parse(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
        require_profile: bool,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Syntax(e.to_string()))?;
        apply_env(&mut table, env)?;
        if require_profile && !table.contains_key("profile") {
            return Err(invalid(
                "profile",
                "a config file must declare profile = \"dev\" or profile = \"prod\"",
            ));
        }
        let de = toml::Value::Table(table);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            if let Some(rest) = inner.strip_prefix("unknown field `") {
                // The path already ends with the unknown field's name.
                let field = rest.split('`').next().unwrap_or(rest);
                let key = if path == "." || path.is_empty() {
                    field.to_string()
                } else {
                    path
                };
                ConfigError::UnknownKey(key)
            } else {
                invalid(&path, inner.lines().next().unwrap_or("").to_string())
            }
        })
    }
}

/// Apply `IMGATE__SECTION__KEY=value` (or `IMGATE__KEY` for top-level keys) to the table.
pub(super) fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    for (name, value) in env {
        let Some(path) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let parts: Vec<String> = path.split("__").map(|p| p.to_ascii_lowercase()).collect();
        if parts.iter().any(|p| p.is_empty()) || parts.len() > 2 {
            return Err(ConfigError::UnknownKey(format!(
                "{} (from {name})",
                parts.join(".")
            )));
        }
        // A value is TOML when it parses as one (`100`, `true`, `["a"]`), else a string.
        let parsed = format!("v = {value}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or(toml::Value::String(value.clone()));
        let mut target = &mut *table;
        for section in &parts[..parts.len() - 1] {
            let entry = target
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            target = entry
                .as_table_mut()
                .ok_or_else(|| invalid(section, "is not a section"))?;
        }
        target.insert(parts[parts.len() - 1].clone(), parsed);
    }
    Ok(())
}
