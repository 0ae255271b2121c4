//! Unit tests of the state copy's bookkeeping (`session::protect`):
//! which statements spoil it, when it serves, when it is renewed.

use super::*;

#[test]
fn plain_reads_are_told_from_changes() {
    assert!(is_plain_read(b"SELECT 1"));
    assert!(is_plain_read(b"select * from t where id = 3;  "));
    assert!(!is_plain_read(b"SELECT @a := 1"));
    assert!(!is_plain_read(b"SELECT 1; SET @a = 2"));
}

#[test]
fn a_copy_serves_only_while_clean_fresh_and_within_the_cap() {
    let cfg = ProtectConfig {
        enabled: true,
        state_cap: 100,
        // Export as soon as asked: the quiet period has its own tests.
        delay_ms: 0,
        ..ProtectConfig::default()
    };
    let t0 = Instant::now();
    let mut p = Protection::new();
    assert_eq!(p.usable(&cfg, t0).err(), Some(Unprotected::Stale));
    assert!(p.export_due(&cfg, t0, false, None));
    p.store(
        &cfg,
        t0,
        Bytes::from_static(b"{}"),
        Bytes::from_static(b"tok"),
    );
    assert!(p.usable(&cfg, t0).is_ok());
    assert!(!p.export_due(&cfg, t0 + Duration::from_secs(29), false, None));
    assert!(p.export_due(&cfg, t0 + Duration::from_secs(30), false, None));
    assert_eq!(
        p.usable(&cfg, t0 + Duration::from_secs(50)).err(),
        Some(Unprotected::Expired)
    );
    // A read keeps the copy; a change spoils it.
    p.on_command(b"\x03SELECT 1", 9);
    p.on_done(Duration::ZERO, Some(Command::Query), true, true);
    assert!(p.usable(&cfg, t0).is_ok());
    p.on_command(b"\x03SET @a = 1", 11);
    p.on_done(Duration::ZERO, Some(Command::Query), true, false);
    assert_eq!(p.usable(&cfg, t0).err(), Some(Unprotected::Stale));
    // Over the cap: unprotected until a smaller state is exported.
    p.store(&cfg, t0, Bytes::from(vec![b'x'; 101]), Bytes::new());
    assert_eq!(p.usable(&cfg, t0).err(), Some(Unprotected::TooLarge));
    p.refused(true);
    assert_eq!(p.usable(&cfg, t0).err(), Some(Unprotected::Off));
    assert!(!p.export_due(&cfg, t0, false, None));
}
