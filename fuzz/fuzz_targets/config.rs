//! Config files and environment overrides: any text parses to a config or an error naming
//! what is wrong, and validation never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // A line starting with IMGATE__ is an environment override, the rest the file.
    let (env, file): (Vec<_>, Vec<_>) = text.lines().partition(|l| l.starts_with("IMGATE__"));
    let env = env.into_iter().filter_map(|l| {
        l.split_once('=')
            .map(|(k, v)| (k.to_string(), v.to_string()))
    });
    if let Ok(cfg) = imgate::config::Config::from_toml_str(&file.join("\n"), env) {
        let _ = cfg.validate();
    }
});
