//! `holdfast drill --faults kill-mid-upload`: video reviews uploaded with tus through the
//! balancer while the instance taking each PATCH is SIGKILLed, beside the shop's own load.
//! Its own test binary, so it does not share the two cores with the other drills.

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");

#[test]
fn uploads_survive_their_instances_being_killed_mid_patch() {
    let dir = tempfile::tempdir().unwrap();
    let (out, r, _) = holdfast_testkit::process::run_drill(
        BIN.as_ref(),
        dir.path(),
        "uploads",
        &[
            "--faults",
            "kill-mid-upload",
            "--duration",
            "30s",
            "--users",
            "8",
            "--think-time",
            "100ms",
            "--instances",
            "3",
            "--workers",
            "1",
            "--seed",
            "3",
            "--no-alerts",
        ],
    );
    assert_eq!(r["verdict"], "pass", "violated: {}", r["violated"]);
    assert!(out.status.success());
    let u = &r["uploads"];
    let uploads = u["uploads"].as_array().expect("uploads");
    assert!(uploads.len() >= 4, "{u:#}");
    assert!(uploads.iter().all(|u| u["completed"] == true), "{u:#}");
    // The fault did what it says: instances died mid-PATCH and clients resumed.
    assert!(u["kills_mid_patch"].as_u64().unwrap() >= 3, "{u:#}");
    let resumes: usize = uploads
        .iter()
        .map(|u| u["resent"].as_array().map_or(0, Vec::len))
        .sum();
    assert!(resumes >= 1, "{u:#}");
    for k in [
        "uploads_corrupted",
        "upload_offsets_backwards",
        "upload_resent_over_chunk",
        "uploads_unfinished",
    ] {
        assert_eq!(r[k], 0, "{k}");
    }
}
