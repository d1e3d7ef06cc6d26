//! Socket calls the standard library does not offer: sends without SIGPIPE, gathered sends.

use std::io;

/// `send(2)` without SIGPIPE (the library may live in a process that does not ignore it).
pub(super) fn send_nosignal(fd: i32, data: &[u8]) -> io::Result<usize> {
    // SAFETY: `data` is a valid readable buffer of `data.len()` bytes.
    let rc = unsafe { libc::send(fd, data.as_ptr().cast(), data.len(), libc::MSG_NOSIGNAL) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

/// Header and payload in one `sendmsg(2)` (one syscall for small frames), without SIGPIPE.
pub(super) fn send2_nosignal(fd: i32, a: &[u8], b: &[u8]) -> io::Result<usize> {
    let mut iov = [
        libc::iovec {
            iov_base: a.as_ptr() as *mut _,
            iov_len: a.len(),
        },
        libc::iovec {
            iov_base: b.as_ptr() as *mut _,
            iov_len: b.len(),
        },
    ];
    // SAFETY: msghdr is plain data; zeroed is a valid empty message, then iov is filled in.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = 2;
    // SAFETY: `msg` points at two valid iovecs over live buffers.
    let rc = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

pub(super) fn recv_some(fd: i32, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid writable buffer of `buf.len()` bytes.
    let rc = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

pub(super) fn would_block(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// Copies `local.len()` bytes from address `remote` of process `pid` into `local`
/// (`process_vm_readv(2)`: one copy, by this process, with no kernel buffer in between).
pub(super) fn read_peer(pid: i32, remote: u64, local: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < local.len() {
        let rest = &mut local[done..];
        let l = libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        };
        let r = libc::iovec {
            iov_base: (remote + done as u64) as usize as *mut libc::c_void,
            iov_len: rest.len(),
        };
        // SAFETY: `l` describes writable memory of this process; the remote range is only
        // read, by the kernel, which checks it against the other process's mappings.
        let rc = unsafe { libc::process_vm_readv(pid, &l, 1, &r, 1, 0) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if rc == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer's buffer ended early",
            ));
        }
        done += rc as usize;
    }
    Ok(())
}

/// Bytes from the kernel's random source (zeros where it is unavailable).
pub(super) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // SAFETY: `b` is a writable buffer of N bytes.
    let _ = unsafe { libc::getrandom(b.as_mut_ptr().cast(), N, 0) };
    b
}

/// Copies what is waiting on `fd` into `buf` without consuming it and without waiting; returns
/// `recv(2)`'s result (bytes seen, 0 at end of stream, negative on error or nothing waiting).
pub(super) fn peek(fd: i32, buf: &mut [u8]) -> isize {
    // SAFETY: `buf` is a writable buffer of `buf.len()` bytes.
    unsafe {
        libc::recv(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    }
}
