//! The retry policy: exponential backoff with jitter (the `backoff` crate) and the single
//! place that decides whether an error is transient, permanent, or a full local disk.

use std::time::Duration;

use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;

use crate::config::RetryConfig;

/// How an error is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Timeouts, connection errors, 5xx, SlowDown: retried with growing delays, forever.
    Transient,
    /// AccessDenied, bad credentials, no such bucket, local EACCES: the row goes to `failed`
    /// and is retried at the max interval, in case someone fixes the cause.
    Permanent,
    /// ENOSPC or SQLITE_FULL: the file stays in the spool; retried like a transient error.
    LocalFull,
}

/// S3 error codes that no retry can fix without a human.
pub fn classify_s3_code(code: &str) -> Option<Class> {
    match code {
        "AccessDenied"
        | "SignatureDoesNotMatch"
        | "InvalidAccessKeyId"
        | "NoSuchBucket"
        | "AllAccessDisabled"
        | "AccountProblem"
        | "InvalidBucketName"
        | "InvalidObjectState"
        | "NotSignedUp"
        | "InvalidToken"
        | "ExpiredToken"
        | "MethodNotAllowed" => Some(Class::Permanent),
        "SlowDown"
        | "RequestTimeout"
        | "RequestTimeTooSkewed"
        | "InternalError"
        | "ServiceUnavailable"
        | "Throttling"
        | "ThrottlingException"
        | "RequestLimitExceeded"
        | "BadDigest"
        | "IncompleteBody"
        | "XAmzContentSHA256Mismatch"
        | "InvalidDigest"
        | "NoSuchUpload"
        | "InvalidPart" => Some(Class::Transient),
        _ => None,
    }
}

/// HTTP status fallback when the error code is unknown.
pub fn classify_status(status: u16) -> Class {
    match status {
        401 | 403 => Class::Permanent,
        404 => Class::Permanent,
        _ => Class::Transient,
    }
}

/// Local I/O errors: a full disk is its own class, permission problems are permanent.
pub fn classify_io(err: &std::io::Error) -> Class {
    match err.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => Class::LocalFull,
        Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => Class::Permanent,
        _ => Class::Transient,
    }
}

/// The delay before attempt number `attempt` (1 = the first retry).
#[derive(Debug, Clone)]
pub struct Policy {
    initial: Duration,
    max_interval: Duration,
    multiplier: f64,
}

impl Policy {
    pub fn new(cfg: &RetryConfig) -> Policy {
        Policy {
            initial: cfg.initial.0,
            max_interval: cfg.max_interval.0,
            multiplier: cfg.multiplier,
        }
    }

    /// The un-jittered interval for `attempt`: initial × multiplier^(attempt-1), capped.
    pub fn base(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(64) as i32;
        let secs = self.initial.as_secs_f64() * self.multiplier.powi(exp);
        if !secs.is_finite() || secs >= self.max_interval.as_secs_f64() {
            self.max_interval
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// The jittered delay for `attempt` and error `class`. Permanent errors wait the max
    /// interval; a server's Retry-After is honoured when it asks for longer.
    pub fn delay(&self, attempt: u32, class: Class, retry_after: Option<Duration>) -> Duration {
        let base = match class {
            Class::Permanent => self.max_interval,
            Class::Transient | Class::LocalFull => self.base(attempt),
        };
        // The backoff crate supplies the jitter: randomized_interval in [base(1-f), base(1+f)].
        let mut b = ExponentialBackoff {
            current_interval: base,
            initial_interval: base,
            randomization_factor: 0.25,
            multiplier: 1.0,
            max_interval: self.max_interval,
            max_elapsed_time: None,
            ..ExponentialBackoff::default()
        };
        let jittered = b.next_backoff().unwrap_or(base).min(self.max_interval);
        // The server's wish is honoured up to the operator's ceiling: an uncapped
        // Retry-After could park a file for years, or overflow the due time it is added to.
        match retry_after {
            Some(ra) if ra > jittered => ra.min(self.max_interval),
            _ => jittered,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dur;
    use proptest::prelude::*;

    fn policy() -> Policy {
        Policy::new(&RetryConfig {
            initial: Dur(Duration::from_millis(500)),
            max_interval: Dur(Duration::from_secs(300)),
            multiplier: 2.0,
        })
    }

    #[test]
    fn base_grows_and_caps() {
        let p = policy();
        assert_eq!(p.base(1), Duration::from_millis(500));
        assert_eq!(p.base(2), Duration::from_secs(1));
        assert_eq!(p.base(5), Duration::from_secs(8));
        assert_eq!(p.base(30), Duration::from_secs(300));
        assert_eq!(p.base(u32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn permanent_waits_max_and_retry_after_is_honoured() {
        let p = policy();
        let d = p.delay(1, Class::Permanent, None);
        assert!(
            d >= Duration::from_secs(225) && d <= Duration::from_secs(300),
            "{d:?}"
        );
        let d = p.delay(1, Class::Transient, Some(Duration::from_secs(20)));
        assert_eq!(d, Duration::from_secs(20));
        // A hostile or broken server's Retry-After stops at retry.max_interval.
        let d = p.delay(1, Class::Transient, Some(Duration::from_secs(u64::MAX)));
        assert_eq!(d, Duration::from_secs(300));
    }

    #[test]
    fn classification() {
        assert_eq!(classify_s3_code("AccessDenied"), Some(Class::Permanent));
        assert_eq!(
            classify_s3_code("SignatureDoesNotMatch"),
            Some(Class::Permanent)
        );
        assert_eq!(classify_s3_code("NoSuchBucket"), Some(Class::Permanent));
        assert_eq!(classify_s3_code("SlowDown"), Some(Class::Transient));
        assert_eq!(
            classify_s3_code("RequestTimeTooSkewed"),
            Some(Class::Transient)
        );
        assert_eq!(classify_s3_code("BadDigest"), Some(Class::Transient));
        assert_eq!(classify_status(503), Class::Transient);
        assert_eq!(classify_status(403), Class::Permanent);
        let e = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(classify_io(&e), Class::LocalFull);
        let e = std::io::Error::from_raw_os_error(libc::EACCES);
        assert_eq!(classify_io(&e), Class::Permanent);
        let e = std::io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(classify_io(&e), Class::Transient);
    }

    proptest! {
        #[test]
        fn delay_within_jitter_bounds(attempt in 1u32..200) {
            let p = policy();
            let base = p.base(attempt);
            let d = p.delay(attempt, Class::Transient, None);
            prop_assert!(d.as_secs_f64() >= base.as_secs_f64() * 0.75 - 1e-3);
            prop_assert!(d.as_secs_f64() <= (base.as_secs_f64() * 1.25).min(300.0) + 1e-3);
        }
    }
}
