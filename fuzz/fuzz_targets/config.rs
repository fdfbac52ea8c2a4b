//! The config file: `Config::parse("fuzz.yaml", text)`.
//!
//! Input: YAML text (not UTF-8: skipped, as `Config::load` refuses it before parsing).
//!
//! Invariants checked besides "no panic":
//! - an error reads `fuzz.yaml: <key path>: <message>` (the design's config error format);
//! - a config that parses can be used as the start-up does without I/O: every destination's
//!   policy resolves, and the health model's settings derive from it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshlet::config::{Config, ConfigError};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse("fuzz.yaml", text) {
        Err(e) => {
            let ConfigError::Invalid { path, message, .. } = &e else {
                panic!("parsing text reported a read error: {e}");
            };
            assert!(!path.is_empty(), "an error without a key path: {e}");
            assert!(!message.is_empty(), "an error without a message: {e}");
            assert!(e.to_string().starts_with("fuzz.yaml: "), "{e}");
        }
        Ok(config) => {
            let _ = config.defaults.resolve();
            for s in &config.discovery.static_services {
                let _ = config.defaults.overlay(&s.policy).resolve();
            }
            let settings = meshlet::ops::health::model::Settings::from_config(&config.health);
            let _ = settings.tick();
            let _ = config.health.declared();
        }
    }
});
