//! The open-files limit (`RLIMIT_NOFILE`): a server with many clients needs
//! one descriptor per connection, and the soft limit a shell hands out
//! (often 1024) is far below what the system allows.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
use std::io;

/// Raises the soft open-files limit to the hard limit; returns the soft
/// limit now in force and the hard limit (`u64::MAX` for unlimited).
///
/// Where the hard limit is unlimited, the kernel still caps descriptors
/// (Linux's `fs.nr_open`, macOS's `kern.maxfilesperproc`), so the highest
/// of a few common caps that it accepts is taken. When none is accepted the
/// limit stays as it was and the error of the first attempt is returned.
pub fn raise_open_files_limit() -> io::Result<(u64, u64)> {
    let limit = getrlimit(Resource::Nofile);
    let soft = limit.current.unwrap_or(u64::MAX);
    let hard = limit.maximum.unwrap_or(u64::MAX);
    if soft >= hard {
        return Ok((soft, hard));
    }
    let targets: &[u64] = match limit.maximum {
        Some(hard) => &[hard],
        None => &[1 << 20, 1 << 16, 10_240],
    };
    let mut first_error = None;
    for &target in targets.iter().filter(|&&t| t > soft) {
        let raised = Rlimit {
            current: Some(target),
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => return Ok((target, hard)),
            Err(e) => {
                first_error.get_or_insert(io::Error::from(e));
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok((soft, hard)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let before = getrlimit(Resource::Nofile);
        let (soft, hard) = raise_open_files_limit().unwrap();
        let after = getrlimit(Resource::Nofile);
        assert_eq!(after.current, Some(soft), "it reports the limit in force");
        assert_eq!(after.maximum, before.maximum, "the hard limit is untouched");
        assert_eq!(hard, before.maximum.unwrap_or(u64::MAX));
        if before.maximum.is_some() {
            assert_eq!(soft, hard);
        }
        assert!(soft >= before.current.unwrap_or(u64::MAX), "never lowered");
        assert_eq!(
            raise_open_files_limit().unwrap(),
            (soft, hard),
            "idempotent"
        );
    }
}
