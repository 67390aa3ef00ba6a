//! What survives an abort: a decoder that overflows its stack or asks for more memory than the
//! system gives ends the process (neither unwinds), so the input being run is kept where a
//! `SIGABRT` handler can write it to a file before the process dies.

use std::ffi::CString;
use std::path::Path;
use std::sync::Once;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

static PATH: AtomicPtr<libc::c_char> = AtomicPtr::new(std::ptr::null_mut());
static INPUT: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
static INPUT_LEN: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_abort(_: libc::c_int) {
    // Only async-signal-safe calls here: open, write, close.
    let path = PATH.load(Ordering::SeqCst);
    let input = INPUT.load(Ordering::SeqCst);
    let len = INPUT_LEN.load(Ordering::SeqCst);
    if path.is_null() || input.is_null() {
        return;
    }
    // SAFETY: `path` is a leaked NUL-terminated string; `input` points at `len` bytes that stay
    // alive while they run (see `arm`). The handler returns and abort(3) kills the process.
    unsafe {
        let fd = libc::open(path, libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC, 0o644);
        if fd >= 0 {
            let mut done = 0;
            while done < len {
                let n = libc::write(fd, input.add(done).cast(), len - done);
                if n <= 0 {
                    break;
                }
                done += n as usize;
            }
            libc::close(fd);
        }
        let note = b"talaria-fuzz: aborted; the input that ran is in the abort file\n";
        libc::write(2, note.as_ptr().cast(), note.len());
    }
}

/// Installs the handler (once) and names the file the input of an abort goes to.
pub fn install(file: &Path) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a plain handler with an empty mask; SA_ONSTACK so that it also runs after a
        // stack overflow (std gives its threads an alternate signal stack).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_abort as *const () as usize;
            sa.sa_flags = libc::SA_ONSTACK | libc::SA_RESETHAND;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGABRT, &sa, std::ptr::null_mut());
        }
    });
    if let Ok(c) = CString::new(file.as_os_str().as_encoded_bytes()) {
        let old = PATH.swap(c.into_raw(), Ordering::SeqCst);
        if !old.is_null() {
            // SAFETY: made by `CString::into_raw` above and no longer published.
            drop(unsafe { CString::from_raw(old) });
        }
    }
}

/// Marks `input` as the one running now; it must stay alive and unchanged until [`disarm`].
pub fn arm(input: &[u8]) {
    INPUT_LEN.store(input.len(), Ordering::SeqCst);
    INPUT.store(input.as_ptr().cast_mut(), Ordering::SeqCst);
}

/// No input is running.
pub fn disarm() {
    INPUT.store(std::ptr::null_mut(), Ordering::SeqCst);
}
