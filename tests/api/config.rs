use std::collections::HashMap;

use cardgate::Config;

fn base_env() -> HashMap<String, String> {
    let mut env = HashMap::new();
    env.insert("CARDGATE_MASTER_KEY".into(), "ab".repeat(32));
    env.insert("CARDGATE_JWT_SECRET".into(), "j".repeat(32));
    env
}

fn load(env: &HashMap<String, String>) -> Result<Config, String> {
    let config = Config::load(env).map_err(|e| e.to_string())?;
    config.validate().map_err(|e| e.to_string())?;
    Ok(config)
}

#[test]
fn defaults_load_and_validate() {
    let config = load(&base_env()).unwrap();
    assert_eq!(config.currency, "CNY");
    assert_eq!(config.http.json_body_max_bytes, 64 * 1024);
    for tier in ["standard", "silver", "gold", "diamond"] {
        assert!(config.tiers.contains_key(tier), "{tier}");
    }
}

#[test]
fn environment_overrides_top_level_and_nested_settings() {
    let mut env = base_env();
    env.insert("CARDGATE_LISTEN".into(), "127.0.0.1:9999".into());
    env.insert("CARDGATE_HTTP__JSON_BODY_MAX_BYTES".into(), "1024".into());
    let config = load(&env).unwrap();
    assert_eq!(config.listen, "127.0.0.1:9999");
    assert_eq!(config.http.json_body_max_bytes, 1024);
}

#[test]
fn a_bad_master_key_names_the_setting_and_never_echoes_it() {
    let mut env = base_env();
    let bad = "zz-not-hex-secret-value-0123456789";
    env.insert("CARDGATE_MASTER_KEY".into(), bad.into());
    let err = load(&env).unwrap_err();
    assert!(err.contains("CARDGATE_MASTER_KEY"), "{err}");
    assert!(!err.contains(bad), "the secret leaked into: {err}");
}

/// Values are strings until read as their setting's type: secrets made of decimal digits
/// keep every digit, and a list is split on commas.
#[test]
fn secrets_of_digits_are_read_as_written() {
    use secrecy::ExposeSecret;
    for key in ["0".repeat(64), "1234567890".repeat(6) + "0123"] {
        let mut env = base_env();
        env.insert("CARDGATE_MASTER_KEY".into(), key.clone());
        env.insert("CARDGATE_JWT_SECRET".into(), "0".repeat(40));
        let config = load(&env).unwrap();
        assert_eq!(
            config.validate().unwrap().master_key.to_vec(),
            hex::decode(&key).unwrap()
        );
        assert_eq!(config.jwt_secret.unwrap().expose_secret(), "0".repeat(40));
    }
    let mut env = base_env();
    env.insert("CARDGATE_HTTP__TRUSTED_PROXIES".into(), "10.0.0.0/8, 127.0.0.1".into());
    let config = load(&env).unwrap();
    assert_eq!(config.http.trusted_proxies, ["10.0.0.0/8", "127.0.0.1"]);
}

#[test]
fn the_master_key_and_jwt_secret_are_required() {
    for key in ["CARDGATE_MASTER_KEY", "CARDGATE_JWT_SECRET"] {
        let mut env = base_env();
        env.remove(key);
        let err = load(&env).unwrap_err();
        assert!(err.contains(key) && err.contains("required"), "{err}");
    }
}

#[test]
fn bad_values_name_their_setting() {
    for (key, value, named) in [
        ("CARDGATE_LISTEN", "not-an-address", "CARDGATE_LISTEN"),
        ("CARDGATE_HTTP__JSON_BODY_MAX_BYTES", "0", "http.json_body_max_bytes"),
        ("CARDGATE_HTTP__JSON_BODY_MAX_BYTES", "lots", "json_body_max_bytes"),
        ("CARDGATE_JWT_SECRET", "short", "CARDGATE_JWT_SECRET"),
        ("CARDGATE_BOOTSTRAP_ADMIN", "no-colon-here", "CARDGATE_BOOTSTRAP_ADMIN"),
        ("CARDGATE_CURRENCY", "yuan", "currency"),
        ("CARDGATE_REDIS_URL", "http://x", "CARDGATE_REDIS_URL"),
    ] {
        let mut env = base_env();
        env.insert(key.into(), value.into());
        let err = load(&env).expect_err(key);
        assert!(err.contains(named), "{key}={value}: {err}");
        if key == "CARDGATE_JWT_SECRET" || key == "CARDGATE_BOOTSTRAP_ADMIN" {
            assert!(!err.contains(value), "secret echoed: {err}");
        }
    }
}

#[test]
fn a_tier_in_the_override_file_replaces_the_default_whole_and_new_tiers_add() {
    let dir = std::env::temp_dir().join(format!("cardgate-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("override.toml");
    std::fs::write(
        &file,
        r#"
currency = "USD"
[tiers.gold]
priority = 99
orders_per_second = 1
orders_burst = 2
reads_per_second = 3
reads_burst = 4
max_quantity = 5
max_batch = 6
[tiers.platinum]
priority = 50
orders_per_second = 10
orders_burst = 10
reads_per_second = 10
reads_burst = 10
max_quantity = 10
max_batch = 10
"#,
    )
    .unwrap();
    let mut env = base_env();
    env.insert("CARDGATE_CONFIG".into(), file.display().to_string());
    let config = load(&env).unwrap();
    assert_eq!(config.currency, "USD");
    let gold = &config.tiers["gold"];
    assert_eq!((gold.priority, gold.orders_burst, gold.max_batch), (99, 2, 6));
    assert_eq!(config.tiers["platinum"].priority, 50);
    assert_eq!(config.tiers["silver"].priority, 20, "untouched defaults stay");
    // The environment overrides the file's tier as any other setting.
    env.insert("CARDGATE_TIERS__GOLD__ORDERS_BURST".into(), "7".into());
    let config = load(&env).unwrap();
    let gold = &config.tiers["gold"];
    assert_eq!((gold.priority, gold.orders_burst, gold.max_batch), (99, 7, 6));
    env.remove("CARDGATE_TIERS__GOLD__ORDERS_BURST");

    // A partial tier table is an error naming the tier, not a silent merge.
    std::fs::write(&file, "[tiers.gold]\npriority = 1\n").unwrap();
    let err = load(&env).unwrap_err();
    assert!(err.contains("tiers.gold"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_missing_override_file_is_an_error_naming_it() {
    let mut env = base_env();
    env.insert("CARDGATE_CONFIG".into(), "/nonexistent/cardgate.toml".into());
    let err = load(&env).unwrap_err();
    assert!(err.contains("CARDGATE_CONFIG"), "{err}");
}
