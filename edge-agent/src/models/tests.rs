use std::sync::atomic::Ordering;

use edgeloop_proto::features::FeatureSet;
use edgeloop_proto::model::{quantize, FloatModel, Int8Model};
use edgeloop_proto::signing::{sign_update, SigningKey};
use edgeloop_proto::v1::Reading;

use super::*;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const PROFILE: &str = "int8";

fn device_channels() -> Vec<String> {
    vec!["temperature".into(), "humidity".into(), "vibration".into()]
}

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

/// A float model over `channels` and `window`: class `hot` wins when the
/// window's mean of the first channel is above 25 (features are
/// standardized with mean 0 and std 1, so the weights see raw features).
fn float_model(channels: &[&str], window: usize) -> Result<FloatModel, Box<dyn std::error::Error>> {
    let features = FeatureSet {
        channels: channels.iter().map(|c| c.to_string()).collect(),
        window,
    };
    let n_in = features.len();
    let mut weights = vec![0.0f32; 2 * n_in];
    // Row 1 ("hot"): + mean of channel 0, + a little of its slope.
    weights[n_in] = 1.0;
    weights[n_in + 4] = 0.5;
    Ok(FloatModel::new(
        features,
        vec!["normal".into(), "hot".into()],
        vec![0.0; n_in],
        vec![1.0; n_in],
        weights,
        vec![0.0, -25.0],
    )?)
}

fn int8_model(channels: &[&str], window: usize) -> Result<Int8Model, Box<dyn std::error::Error>> {
    let float = float_model(channels, window)?;
    let n_in = float.n_inputs();
    let calibration: Vec<Vec<f32>> = (0..40)
        .map(|i| {
            (0..n_in)
                .map(|j| 15.0 + (i as f32) * 0.5 - (j % 6) as f32)
                .collect()
        })
        .collect();
    Ok(quantize(&float, &calibration)?)
}

fn update(task: &str, version: u64, artifact: &Artifact, signer: &SigningKey) -> ModelUpdate {
    let mut u = ModelUpdate {
        task: task.into(),
        profile: PROFILE.into(),
        version,
        artifact: artifact.encode().into(),
        format: artifact.format().into(),
        published_at_micros: 1_800_000_000_000_000,
        lineage_json: "{}".into(),
        ..ModelUpdate::default()
    };
    sign_update(&mut u, signer);
    u
}

fn int8_artifact() -> Result<Artifact, Box<dyn std::error::Error>> {
    Ok(Artifact::Int8(int8_model(&["temperature", "humidity"], 4)?))
}

fn open(dir: &Path) -> Result<(Models, Arc<AgentStats>), std::io::Error> {
    let stats = Arc::new(AgentStats::default());
    let models = Models::open(
        "dev-1",
        PROFILE,
        device_channels(),
        key(1).verifying_key(),
        dir,
        stats.clone(),
    )?;
    Ok((models, stats))
}

fn topic(task: &str) -> String {
    topics::models(task, PROFILE)
}

fn refused(outcome: &Outcome) -> Option<&Refusal> {
    match outcome {
        Outcome::Refused(r) => Some(r),
        _ => None,
    }
}

fn versions(models: &Models) -> Vec<(String, u64)> {
    let mut v: Vec<_> = models.applied_versions().into_iter().collect();
    v.sort();
    v
}

/// Applies version 1 of `anomaly`, the model the refusal tests must keep.
fn with_v1(dir: &Path) -> Result<(Models, Arc<AgentStats>), Box<dyn std::error::Error>> {
    let (models, stats) = open(dir)?;
    let v1 = update("anomaly", 1, &int8_artifact()?, &key(1));
    let outcome = models.apply(&topic("anomaly"), &v1.encode_to_vec());
    assert!(
        matches!(outcome, Outcome::Applied { version: 1, .. }),
        "{outcome:?}"
    );
    Ok((models, stats))
}

/// The refusal checks every test below shares: refused, counted, reported
/// with task, version and reason, and version 1 still in use and stored.
fn assert_refused_and_kept(
    models: &Models,
    stats: &AgentStats,
    outcome: &Outcome,
    version: &str,
    reason: &str,
) -> TestResult {
    let refusal = refused(outcome).ok_or_else(|| format!("not refused: {outcome:?}"))?;
    let error = models.last_error();
    assert_eq!(error, refusal.to_string());
    assert!(error.contains("`anomaly`"), "{error}");
    assert!(error.contains(&format!("version {version}")), "{error}");
    assert!(error.contains(reason), "{error}");
    assert_eq!(stats.model_updates_refused.load(Ordering::Relaxed), 1);
    assert_eq!(versions(models), vec![("anomaly".to_string(), 1)]);
    let loaded = models.loaded();
    assert_eq!(loaded.len(), 1);
    assert_eq!(loaded[0].version, 1);
    let stored =
        ModelUpdate::decode(std::fs::read(store::path_of(models.dir(), "anomaly"))?.as_slice())?;
    assert_eq!(stored.version, 1);
    Ok(())
}

#[test]
fn a_signed_update_is_stored_swapped_in_and_reported() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (models, stats) = with_v1(dir.path())?;
    assert_eq!(versions(&models), vec![("anomaly".to_string(), 1)]);
    assert_eq!(models.last_error(), "");
    assert_eq!(stats.model_updates_applied.load(Ordering::Relaxed), 1);
    assert!(store::path_of(dir.path(), "anomaly").is_file());
    // A higher version replaces it.
    let v2 = update("anomaly", 2, &int8_artifact()?, &key(1));
    let outcome = models.apply(&topic("anomaly"), &v2.encode_to_vec());
    assert!(
        matches!(outcome, Outcome::Applied { version: 2, .. }),
        "{outcome:?}"
    );
    assert_eq!(versions(&models), vec![("anomaly".to_string(), 2)]);
    assert_eq!(models.loaded()[0].version, 2);
    Ok(())
}

#[test]
fn an_update_with_one_artifact_byte_changed_is_refused_and_the_model_kept() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (models, stats) = with_v1(dir.path())?;
    let mut v2 = update("anomaly", 2, &int8_artifact()?, &key(1));
    let mut bytes = v2.artifact.to_vec();
    bytes[40] ^= 0x01;
    v2.artifact = bytes.into();
    let outcome = models.apply(&topic("anomaly"), &v2.encode_to_vec());
    assert_refused_and_kept(&models, &stats, &outcome, "2", "SHA-256")
}

#[test]
fn an_update_signed_with_another_key_is_refused_and_the_model_kept() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (models, stats) = with_v1(dir.path())?;
    let v2 = update("anomaly", 2, &int8_artifact()?, &key(2));
    let outcome = models.apply(&topic("anomaly"), &v2.encode_to_vec());
    assert_refused_and_kept(&models, &stats, &outcome, "2", "signature does not verify")
}

#[test]
fn a_lower_version_is_refused_and_an_equal_one_changes_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (models, stats) = open(dir.path())?;
    let v3 = update("anomaly", 3, &int8_artifact()?, &key(1));
    models.apply(&topic("anomaly"), &v3.encode_to_vec());
    // The retained re-delivery after a reconnect: a no-op, not an error.
    let again = models.apply(&topic("anomaly"), &v3.encode_to_vec());
    assert!(
        matches!(again, Outcome::AlreadyApplied { version: 3, .. }),
        "{again:?}"
    );
    assert_eq!(models.last_error(), "");
    assert_eq!(stats.model_updates_refused.load(Ordering::Relaxed), 0);
    assert_eq!(stats.model_updates_applied.load(Ordering::Relaxed), 1);

    let v2 = update("anomaly", 2, &int8_artifact()?, &key(1));
    let outcome = models.apply(&topic("anomaly"), &v2.encode_to_vec());
    let refusal = refused(&outcome).ok_or("a lower version must be refused")?;
    assert!(matches!(
        *refusal.reason,
        UpdateError::Older {
            version: 2,
            applied: 3
        }
    ));
    let error = models.last_error();
    assert!(
        error.contains("`anomaly` version 2") && error.contains("lower than version 3"),
        "{error}"
    );
    assert_eq!(versions(&models), vec![("anomaly".to_string(), 3)]);
    assert_eq!(models.loaded()[0].version, 3);
    assert_eq!(stats.model_updates_refused.load(Ordering::Relaxed), 1);
    Ok(())
}

#[test]
fn an_artifact_that_does_not_load_is_refused_and_the_model_kept() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (models, stats) = with_v1(dir.path())?;
    // Signed, so it passes verification, but it is no artifact.
    let mut v2 = update("anomaly", 2, &int8_artifact()?, &key(1));
    v2.artifact = b"EDGELOOP truncated".to_vec().into();
    sign_update(&mut v2, &key(1));
    let outcome = models.apply(&topic("anomaly"), &v2.encode_to_vec());
    assert_refused_and_kept(&models, &stats, &outcome, "2", "does not load")
}

#[test]
fn a_model_reading_a_channel_the_device_lacks_is_refused_and_the_model_kept() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (models, stats) = with_v1(dir.path())?;
    let foreign = Artifact::Int8(int8_model(&["temperature", "pressure"], 4)?);
    let v2 = update("anomaly", 2, &foreign, &key(1));
    let outcome = models.apply(&topic("anomaly"), &v2.encode_to_vec());
    assert_refused_and_kept(&models, &stats, &outcome, "2", "channel `pressure`")
}

#[test]
fn garbage_a_wrong_topic_and_a_cleared_model_are_handled() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (models, stats) = with_v1(dir.path())?;
    let outcome = models.apply(&topic("anomaly"), b"\xff\xfe not a model");
    assert_refused_and_kept(&models, &stats, &outcome, "unknown", "does not decode")?;

    // An update for `anomaly` published on another task's topic.
    let v2 = update("anomaly", 2, &int8_artifact()?, &key(1));
    let outcome = models.apply(&topic("other"), &v2.encode_to_vec());
    assert!(matches!(
        refused(&outcome).map(|r| &*r.reason),
        Some(UpdateError::TopicMismatch { .. })
    ));

    // The retained model cleared, another profile's topic: nothing happens.
    let cleared = models.apply(&topic("anomaly"), b"");
    assert!(matches!(cleared, Outcome::Ignored(_)), "{cleared:?}");
    let other = models.apply("models/anomaly/f32", &v2.encode_to_vec());
    assert!(matches!(other, Outcome::Ignored(_)), "{other:?}");
    assert_eq!(models.loaded()[0].version, 1);
    assert_eq!(stats.model_updates_refused.load(Ordering::Relaxed), 2);
    Ok(())
}

#[test]
fn a_restart_reloads_the_stored_models_and_verifies_them_again() -> TestResult {
    let dir = tempfile::tempdir()?;
    {
        let (models, _) = open(dir.path())?;
        let f32 = Artifact::F32(float_model(&["vibration"], 8)?);
        models.apply(
            &topic("anomaly"),
            &update("anomaly", 4, &int8_artifact()?, &key(1)).encode_to_vec(),
        );
        models.apply(
            &topic("drift"),
            &update("drift", 9, &f32, &key(1)).encode_to_vec(),
        );
    }
    // A write cut short by a power cut leaves a temporary file behind.
    std::fs::write(dir.path().join("anomaly.update.tmp"), b"half")?;
    let (models, stats) = open(dir.path())?;
    assert_eq!(
        versions(&models),
        vec![("anomaly".to_string(), 4), ("drift".to_string(), 9)]
    );
    assert_eq!(models.loaded().len(), 2);
    assert_eq!(models.last_error(), "");
    assert_eq!(stats.model_updates_refused.load(Ordering::Relaxed), 0);
    assert!(!dir.path().join("anomaly.update.tmp").exists());

    // With another provisioned key the same files do not verify: both are
    // quarantined, the agent still starts.
    let stats = Arc::new(AgentStats::default());
    let other = Models::open(
        "dev-1",
        PROFILE,
        device_channels(),
        key(2).verifying_key(),
        dir.path(),
        stats.clone(),
    )?;
    assert!(other.loaded().is_empty());
    assert_eq!(stats.model_updates_refused.load(Ordering::Relaxed), 2);
    assert_eq!(std::fs::read_dir(dir.path().join("quarantine"))?.count(), 2);
    Ok(())
}

#[test]
fn a_corrupt_stored_model_is_quarantined_not_deleted_and_reported() -> TestResult {
    let dir = tempfile::tempdir()?;
    {
        let (models, _) = open(dir.path())?;
        models.apply(
            &topic("anomaly"),
            &update("anomaly", 4, &int8_artifact()?, &key(1)).encode_to_vec(),
        );
        let f32 = Artifact::F32(float_model(&["vibration"], 8)?);
        models.apply(
            &topic("drift"),
            &update("drift", 2, &f32, &key(1)).encode_to_vec(),
        );
    }
    // One byte of the stored anomaly model flips on the disk.
    let path = store::path_of(dir.path(), "anomaly");
    let mut bytes = std::fs::read(&path)?;
    let last = bytes.len() - 1;
    bytes[last / 2] ^= 0x40;
    std::fs::write(&path, &bytes)?;

    let (models, stats) = open(dir.path())?;
    assert_eq!(versions(&models), vec![("drift".to_string(), 2)]);
    assert!(!path.exists());
    let quarantined: Vec<_> =
        std::fs::read_dir(dir.path().join("quarantine"))?.collect::<Result<_, _>>()?;
    assert_eq!(quarantined.len(), 1);
    assert_eq!(
        std::fs::read(quarantined[0].path())?,
        bytes,
        "kept as it was"
    );
    let error = models.last_error();
    assert!(
        error.contains("anomaly.update") && error.contains("quarantine"),
        "{error}"
    );
    assert_eq!(stats.model_updates_refused.load(Ordering::Relaxed), 1);
    // The agent still runs the other model and can take a new one.
    let outcome = models.apply(
        &topic("anomaly"),
        &update("anomaly", 1, &int8_artifact()?, &key(1)).encode_to_vec(),
    );
    assert!(
        matches!(outcome, Outcome::Applied { version: 1, .. }),
        "{outcome:?}"
    );
    Ok(())
}

fn readings(n: usize) -> Vec<Reading> {
    (0..n)
        .map(|i| {
            let t = i as f64;
            // Temperature rises through 25 and falls back; humidity has a
            // missing value now and then; some readings lack a value.
            let temp = 20.0 + 8.0 * (t / 7.0).sin() + (t * 0.37).cos();
            let mut values = vec![
                temp,
                if i % 5 == 3 { f64::NAN } else { 40.0 + t * 0.1 },
                1.0 + (t * 0.9).sin(),
            ];
            if i % 11 == 10 {
                values.truncate(2);
            }
            Reading {
                ts_micros: 1_800_000_000_000_000 + (i as i64) * 100_000 + (i as i64 % 3) * 7,
                values,
                true_label: String::new(),
                predictions: Vec::new(),
            }
        })
        .collect()
}

/// The expected class label of `artifact` at reading `i`: features by
/// `extract_columns` over the last `window` readings, class by the proto
/// kernel called directly.
fn expected(
    artifact: &Artifact,
    all: &[Reading],
    i: usize,
) -> Result<(String, u32), Box<dyn std::error::Error>> {
    let fs = artifact.features();
    let n = fs.window.min(i + 1);
    let rows = &all[i + 1 - n..=i];
    let ts: Vec<i64> = rows.iter().map(|r| r.ts_micros).collect();
    let device = device_channels();
    let columns: Vec<Vec<f64>> = fs
        .channels
        .iter()
        .map(|name| {
            let index = device.iter().position(|c| c == name).unwrap_or(usize::MAX);
            rows.iter()
                .map(|r| r.values.get(index).copied().unwrap_or(f64::NAN))
                .collect()
        })
        .collect();
    let refs: Vec<&[f64]> = columns.iter().map(Vec::as_slice).collect();
    let x = fs.extract_columns(&ts, &refs)?;
    let class = match artifact {
        Artifact::Int8(m) => m.predict(&x)?.class,
        Artifact::F32(m) => m.predict(&x)?.class,
    };
    Ok((artifact.classes()[class].clone(), n as u32))
}

#[test]
fn predictions_are_the_proto_kernels_over_the_same_window() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (models, stats) = open(dir.path())?;
    let int8 = Artifact::Int8(int8_model(&["temperature", "humidity"], 4)?);
    let f32 = Artifact::F32(float_model(&["temperature", "vibration"], 9)?);
    models.apply(
        &topic("anomaly"),
        &update("anomaly", 3, &int8, &key(1)).encode_to_vec(),
    );
    models.apply(
        &topic("drift"),
        &update("drift", 5, &f32, &key(1)).encode_to_vec(),
    );

    let all = readings(60);
    // Appended in batches of varied sizes, as sources do.
    let mut annotated = Vec::new();
    let mut rest = all.clone();
    for size in [1usize, 3, 7, 2, 20, 27] {
        let mut batch: Vec<Reading> = rest.drain(..size.min(rest.len())).collect();
        models.annotate(&mut batch);
        annotated.extend(batch);
    }
    assert_eq!(annotated.len(), 60);
    let mut labels = std::collections::BTreeSet::new();
    let mut int8_labels = std::collections::BTreeSet::new();
    for (i, reading) in annotated.iter().enumerate() {
        assert_eq!(reading.predictions.len(), 2, "reading {i}");
        let by_task = |task: &str| reading.predictions.iter().find(|p| p.task == task);
        let p = by_task("anomaly").ok_or("no anomaly prediction")?;
        assert_eq!(
            (p.label.clone(), p.window),
            expected(&int8, &all, i)?,
            "int8, reading {i}"
        );
        assert_eq!(p.model_version, 3);
        int8_labels.insert(p.label.clone());
        let p = by_task("drift").ok_or("no drift prediction")?;
        assert_eq!(
            (p.label.clone(), p.window),
            expected(&f32, &all, i)?,
            "f32, reading {i}"
        );
        assert_eq!(p.model_version, 5);
        labels.insert(p.label.clone());
    }
    // Both classes occur, so a wrong window or channel would show.
    assert_eq!(labels.len(), 2, "{labels:?}");
    assert_eq!(int8_labels.len(), 2, "{int8_labels:?}");
    assert_eq!(stats.predictions_made.load(Ordering::Relaxed), 120);
    Ok(())
}

#[test]
fn without_a_model_readings_get_no_predictions() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (models, _) = open(dir.path())?;
    let mut batch = readings(5);
    models.annotate(&mut batch);
    assert!(batch.iter().all(|r| r.predictions.is_empty()));
    Ok(())
}
