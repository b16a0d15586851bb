//! The gate's live sessions, by the credential each logged in with, so that
//! a reload of the credentials file ends the sessions of a credential that
//! was removed or changed (a new password, role or `acts_for`): revoking a
//! device's credential takes it off the broker at once, not at its next
//! reconnect.
//!
//! Sessions that logged in with a client certificate or anonymously have no
//! entry here: the file does not grant them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use super::credentials::{Credential, CredentialsFile};

#[derive(Default)]
pub struct Sessions {
    next: AtomicU64,
    live: Mutex<HashMap<u64, (Credential, CancellationToken)>>,
}

/// A session's entry; dropping it removes the entry.
pub struct Registered {
    sessions: Arc<Sessions>,
    key: u64,
    credential: Credential,
    /// Cancelled when the session's credential is revoked.
    pub revoked: CancellationToken,
}

impl Registered {
    /// The credential the session logged in with.
    pub fn credential(&self) -> &Credential {
        &self.credential
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.sessions.lock().remove(&self.key);
    }
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (Credential, CancellationToken)>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a session that logged in with `credential`.
    pub fn register(self: &Arc<Self>, credential: Credential) -> Registered {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let revoked = CancellationToken::new();
        self.lock()
            .insert(key, (credential.clone(), revoked.clone()));
        Registered {
            sessions: self.clone(),
            key,
            credential,
            revoked,
        }
    }

    /// Ends every session whose credential is not in `file` as it was when
    /// the session logged in; how many.
    pub fn revoke_changed(&self, file: &CredentialsFile) -> usize {
        let mut ended = 0;
        for (credential, token) in self.lock().values() {
            if !still_granted(credential, file) && !token.is_cancelled() {
                token.cancel();
                ended += 1;
            }
        }
        ended
    }

    /// Sessions registered now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whether `file` still holds `credential` unchanged.
pub fn still_granted(credential: &Credential, file: &CredentialsFile) -> bool {
    file.credentials.iter().any(|c| c == credential)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::acl::Role;

    fn credential(id: &str, hash: &str) -> Credential {
        Credential {
            id: id.into(),
            role: Role::Device,
            hash: hash.into(),
            acts_for: Vec::new(),
        }
    }

    #[test]
    fn only_sessions_of_removed_or_changed_credentials_are_ended() {
        let sessions = Arc::new(Sessions::default());
        let kept = sessions.register(credential("dev-1", "h1"));
        let removed = sessions.register(credential("dev-2", "h2"));
        let changed = sessions.register(credential("dev-3", "h3"));
        let file = CredentialsFile {
            credentials: vec![credential("dev-1", "h1"), credential("dev-3", "new")],
        };
        assert_eq!(sessions.revoke_changed(&file), 2);
        assert!(!kept.revoked.is_cancelled());
        assert!(removed.revoked.is_cancelled());
        assert!(changed.revoked.is_cancelled());
        assert_eq!(sessions.revoke_changed(&file), 0, "each is ended once");
        drop((removed, changed));
        assert_eq!(sessions.len(), 1);
        drop(kept);
        assert!(sessions.is_empty());
    }
}
