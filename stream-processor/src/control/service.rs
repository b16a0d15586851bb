//! The gRPC services of `control.proto` over [`State`], behind a bearer
//! token check, plus server reflection (open: it tells the schema only).

use std::sync::Arc;
use std::time::Duration;

use rdkafka::producer::{FutureProducer, Producer as _};
use tonic::service::Routes;
use tonic::transport::server::Router;
use tonic::{Request, Response, Status};

use super::pb::{self, fleet_server, health_server, labelling_server, models_server};
use super::{lock, registry, ControlError, State};
use crate::stats::ProcessorStats;

/// Refuses a request whose `authorization` is not `Bearer <token>`.
#[derive(Clone)]
pub struct TokenCheck {
    token: Arc<str>,
}

/// Compares without stopping at the first difference, so the time taken
/// does not tell how much of a guessed token was right.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(value) = request.metadata().get("authorization") else {
            return Err(Status::unauthenticated(
                "this call needs the metadata `authorization: Bearer <control.token>`",
            ));
        };
        let presented = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match presented {
            Some(t) if same(t.as_bytes(), self.token.as_bytes()) => Ok(request),
            _ => Err(Status::unauthenticated("the bearer token is not valid")),
        }
    }
}

/// The services, ready to serve.
pub fn router(state: Arc<State>, token: String) -> Result<Router, ControlError> {
    let check = TokenCheck {
        token: token.into(),
    };
    let producer: FutureProducer = state
        .kafka
        .client_config(&[("acks", "all"), ("client.id", "edgeloop-control")])
        .create()
        .map_err(|e| ControlError::Kafka(e.to_string()))?;
    let api = Api {
        state,
        producer: Arc::new(producer),
    };
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ControlError::Serve(e.to_string()))?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| ControlError::Serve(e.to_string()))?;
    let mut routes = Routes::builder();
    routes
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(fleet_server::FleetServer::with_interceptor(
            api.clone(),
            check.clone(),
        ))
        .add_service(labelling_server::LabellingServer::with_interceptor(
            api.clone(),
            check.clone(),
        ))
        .add_service(models_server::ModelsServer::with_interceptor(
            api.clone(),
            check.clone(),
        ))
        .add_service(health_server::HealthServer::with_interceptor(api, check));
    Ok(tonic::transport::Server::builder().add_routes(routes.routes()))
}

#[derive(Clone)]
struct Api {
    state: Arc<State>,
    producer: Arc<FutureProducer>,
}

impl Api {
    fn device(&self, id: &str) -> Option<pb::Device> {
        let status = lock(&self.state.statuses).get(id).cloned();
        let seen = lock(&self.state.stats.devices).get(id).cloned();
        if status.is_none() && seen.is_none() {
            return None;
        }
        let mut d = pb::Device {
            device_id: id.to_string(),
            ..Default::default()
        };
        if let Some(seen) = seen {
            d.profile = seen.profile;
            d.readings_seen = seen.readings;
            d.last_reading_ts_micros = seen.last_reading_ts_micros;
            d.loss_reports_seen = seen.loss_reports;
            d.readings_reported_lost = seen.readings_lost;
        }
        if let Some(s) = status {
            if !s.profile.is_empty() {
                d.profile = s.profile;
            }
            d.has_status = true;
            d.online = s.online;
            d.agent_version = s.agent_version;
            d.status_ts_micros = s.ts_micros;
            d.backlog_records = s.backlog_records;
            d.backlog_bytes = s.backlog_bytes;
            d.oldest_unacked_ms = s.oldest_unacked_ms;
            d.applied_model_versions = s.applied_model_versions;
            d.lost_readings = s.lost_readings;
            d.last_model_error = s.last_model_error;
            d.next_seq = s.next_seq;
        }
        d.last_seen_micros = d.status_ts_micros.max(d.last_reading_ts_micros);
        d.no_trainer_profile = self
            .state
            .trainer_profiles
            .as_ref()
            .is_some_and(|names| !d.profile.is_empty() && !names.contains(&d.profile));
        Some(d)
    }
}

#[tonic::async_trait]
impl fleet_server::Fleet for Api {
    async fn list_devices(
        &self,
        request: Request<pb::ListDevicesRequest>,
    ) -> Result<Response<pb::ListDevicesResponse>, Status> {
        let profile = request.into_inner().profile;
        let mut ids: Vec<String> = lock(&self.state.statuses).keys().cloned().collect();
        ids.extend(lock(&self.state.stats.devices).keys().cloned());
        ids.sort();
        ids.dedup();
        let devices = ids
            .iter()
            .filter_map(|id| self.device(id))
            .filter(|d| profile.is_empty() || d.profile == profile)
            .collect();
        Ok(Response::new(pb::ListDevicesResponse { devices }))
    }

    async fn get_device(
        &self,
        request: Request<pb::GetDeviceRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        let id = request.into_inner().device_id;
        self.device(&id)
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no device {id:?} is known")))
    }
}

#[tonic::async_trait]
impl labelling_server::Labelling for Api {
    async fn get_rules(
        &self,
        _request: Request<pb::GetRulesRequest>,
    ) -> Result<Response<pb::GetRulesResponse>, Status> {
        let metrics = lock(&self.state.rules);
        let (rules_version, rules) = match &metrics.in_force {
            Some((version, rules)) => (
                version.clone(),
                rules
                    .iter()
                    .map(|(name, label)| pb::RuleDefinition {
                        name: name.clone(),
                        label: label.clone(),
                    })
                    .collect(),
            ),
            None => (String::new(), Vec::new()),
        };
        let statistics = metrics
            .rules
            .iter()
            .map(|((version, rule), (c, accuracy))| pb::RuleStatistics {
                rules_version: version.clone(),
                rule: rule.clone(),
                readings: c.readings,
                votes: c.votes,
                overlaps: c.overlaps,
                conflicts: c.conflicts,
                agreements: c.agreements,
                coverage: if c.readings == 0 {
                    0.0
                } else {
                    c.votes as f64 / c.readings as f64
                },
                estimated_accuracy: *accuracy,
            })
            .collect();
        let stats = &self.state.stats;
        Ok(Response::new(pb::GetRulesResponse {
            rules_version,
            rules_file: self
                .state
                .rules_file
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            rules,
            statistics,
            reloads: ProcessorStats::get(&stats.rules_reloads),
            refused: ProcessorStats::get(&stats.rules_refused),
        }))
    }
}

#[tonic::async_trait]
impl models_server::Models for Api {
    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let req = request.into_inner();
        let registry = lock(&self.state.registry);
        let key = self.state.verify_key.as_ref();
        let models = registry
            .models
            .iter()
            .filter(|((task, profile), _)| {
                (req.task.is_empty() || *task == req.task)
                    && (req.profile.is_empty() || *profile == req.profile)
            })
            .flat_map(|(_, versions)| {
                let live = versions.keys().next_back().copied();
                let registry = &registry;
                versions.iter().map(move |(v, e)| pb::ModelVersion {
                    pinned: registry.is_pinned(e),
                    ..registry::describe(e, Some(*v) == live, key)
                })
            })
            .collect();
        Ok(Response::new(pb::ListModelsResponse { models }))
    }

    async fn get_model(
        &self,
        request: Request<pb::GetModelRequest>,
    ) -> Result<Response<pb::GetModelResponse>, Status> {
        let req = request.into_inner();
        let registry = lock(&self.state.registry);
        let entry = registry
            .get(&req.task, &req.profile, req.version)
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no version {} of {}/{} in the registry",
                    if req.version == 0 {
                        "(live)".to_string()
                    } else {
                        req.version.to_string()
                    },
                    req.task,
                    req.profile
                ))
            })?;
        let live = registry.live(&req.task, &req.profile) == Some(entry.update.version);
        Ok(Response::new(pb::GetModelResponse {
            model: Some(pb::ModelVersion {
                pinned: registry.is_pinned(entry),
                ..registry::describe(entry, live, self.state.verify_key.as_ref())
            }),
            artifact: if req.include_artifact {
                entry.update.artifact.to_vec()
            } else {
                Vec::new()
            },
        }))
    }

    async fn rollback(
        &self,
        request: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::RollbackResponse>, Status> {
        let published =
            registry::rollback(&self.state, &self.producer, request.into_inner()).await?;
        Ok(Response::new(pb::RollbackResponse {
            published: Some(published),
        }))
    }

    async fn pin(
        &self,
        request: Request<pb::PinRequest>,
    ) -> Result<Response<pb::PinResponse>, Status> {
        registry::pin(&self.state, &self.producer, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn unpin(
        &self,
        request: Request<pb::UnpinRequest>,
    ) -> Result<Response<pb::UnpinResponse>, Status> {
        registry::unpin(&self.state, &self.producer, request.into_inner())
            .await
            .map(Response::new)
    }
}

fn feed_health(name: &str, h: &super::FeedHealth, what: String) -> pb::ComponentHealth {
    let (ok, detail) = match (&h.error, h.caught_up) {
        (Some(e), _) => (false, format!("error: {e}")),
        (None, false) => (false, format!("catching up; {} records read", h.records)),
        (None, true) => (
            true,
            format!("caught up; {} records read, {what}", h.records),
        ),
    };
    pb::ComponentHealth {
        name: name.into(),
        ok,
        detail,
    }
}

#[tonic::async_trait]
impl health_server::Health for Api {
    async fn get_health(
        &self,
        _request: Request<pb::GetHealthRequest>,
    ) -> Result<Response<pb::GetHealthResponse>, Status> {
        let producer = self.producer.clone();
        let kafka = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, Duration::from_secs(3))
                .map(|m| m.brokers().len())
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        let state = &self.state;
        let stats = &state.stats;
        let mut components = vec![pb::ComponentHealth {
            name: "kafka".into(),
            ok: kafka.is_ok(),
            detail: match kafka {
                Ok(brokers) => format!("reachable; {brokers} broker(s)"),
                Err(e) => format!("unreachable: {e}"),
            },
        }];
        components.push(pb::ComponentHealth {
            name: "processor".into(),
            ok: true,
            detail: format!(
                "{} records consumed, {} rows in {} files written, {} dead letters, {} commit errors",
                ProcessorStats::get(&stats.records_consumed),
                ProcessorStats::get(&stats.rows_written),
                ProcessorStats::get(&stats.files_written),
                ProcessorStats::get(&stats.dead_letters),
                ProcessorStats::get(&stats.commit_errors),
            ),
        });
        let in_force = lock(&state.rules)
            .in_force
            .as_ref()
            .map(|(v, r)| (v.clone(), r.len()));
        components.push(match (&state.rules_file, in_force) {
            (None, _) => pb::ComponentHealth {
                name: "labeller".into(),
                ok: true,
                detail: "no rules file configured: readings are not labelled".into(),
            },
            (Some(path), None) => pb::ComponentHealth {
                name: "labeller".into(),
                ok: false,
                detail: format!(
                    "no rules in force yet from {} ({} refused)",
                    path.display(),
                    ProcessorStats::get(&stats.rules_refused)
                ),
            },
            (Some(_), Some((version, n))) => pb::ComponentHealth {
                name: "labeller".into(),
                ok: true,
                detail: format!(
                    "rules version {version:?} in force ({n} rules; {} reloads, {} refused)",
                    ProcessorStats::get(&stats.rules_reloads),
                    ProcessorStats::get(&stats.rules_refused)
                ),
            },
        });
        let devices = lock(&state.statuses).len();
        components.push(feed_health(
            "status_feed",
            &lock(&state.status_feed),
            format!("{devices} devices"),
        ));
        let models: usize = lock(&state.registry).models.values().map(|v| v.len()).sum();
        components.push(feed_health(
            "models_feed",
            &lock(&state.models_feed),
            format!("{models} model versions"),
        ));
        let pins = lock(&state.registry).pins.len();
        components.push(feed_health(
            "pins_feed",
            &lock(&state.pins_feed),
            format!("{pins} pins"),
        ));
        Ok(Response::new(pb::GetHealthResponse {
            ready: components.iter().all(|c| c.ok),
            components,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor as _;

    fn with_auth(value: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(v) = value {
            if let Ok(v) = v.parse() {
                r.metadata_mut().insert("authorization", v);
            }
        }
        r
    }

    #[test]
    fn token_check_admits_only_the_configured_bearer_token() {
        let mut check = TokenCheck {
            token: "0123456789abcdef".into(),
        };
        assert!(check
            .call(with_auth(Some("Bearer 0123456789abcdef")))
            .is_ok());
        for bad in [
            None,
            Some("Bearer 0123456789abcdeX"),
            Some("Bearer 0123456789abcde"),
            Some("0123456789abcdef"),
            Some("Basic 0123456789abcdef"),
        ] {
            let refused = check.call(with_auth(bad)).expect_err("refused");
            assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
    }
}
