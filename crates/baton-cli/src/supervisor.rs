//! Running CMD while something is held (a lock, a leadership), shared by `baton lock` and
//! `baton elect`.
//!
//! - CMD runs in its own process group, with the holder's environment added; variables
//!   `baton` sets for other holds (left by an outer `baton`) are removed.
//! - SIGINT, SIGTERM, SIGHUP and SIGQUIT sent to `baton` are forwarded to that group (and
//!   the groups its descendants left it for, not below a nested `baton`), except
//!   those ignored when `baton` started (`nohup`): they stay ignored, by CMD too. A group
//!   stopped otherwise than by our job control (CMD read the terminal: SIGTTIN) is then
//!   continued, as shells do, so that it can end. SIGUSR1 and SIGUSR2 are forwarded too;
//!   they never end `baton` (ignored while there is no CMD).
//! - When the hold is lost, the group gets SIGTERM at once, a notice goes to stderr, and the
//!   group gets SIGKILL once `--grace` has passed, unless all of it has exited by then.
//! - When CMD exits, whatever it left running in its group (background jobs) is part of the
//!   job: it gets SIGTERM, and SIGKILL after `--grace`, and the hold is released only once
//!   the group is gone.
//! - A hold found lost after CMD exited (by the time CMD ended, or by the release itself)
//!   still ends with the "lost" exit code: CMD may have run without it.
//! - On Linux, CMD gets SIGTERM if `baton` itself dies (`PR_SET_PDEATHSIG`), and a guardian
//!   process (see [`Guardian`]) sends its whole group SIGTERM, then SIGKILL after `--grace`
//!   but no later than the hold's local deadline: a `baton` killed with SIGKILL never leaves
//!   CMD running once the hold can pass to another. The guardian SIGKILLs the group by that
//!   deadline too if `baton` is stopped (SIGSTOP of `baton` alone) and sends no keep-alive.
//! - Ctrl-Z (SIGTSTP), SIGTTIN and SIGTTOU stop CMD's group first, then `baton`, as a
//!   shell's job control would: CMD never runs on while `baton`'s keep-alives are stopped.
//!   On SIGCONT, `baton` checks the hold before it continues CMD's group: if the hold was
//!   lost while stopped, the group is ended as after any loss (see [`JobControl`]). A stop
//!   signal that nothing could undo (`baton` started by `setsid`, systemd or cron: a process
//!   group the kernel calls orphaned) is ignored, as the kernel ignores it there: CMD and
//!   the keep-alives run on.
//!
//! Without CMD, the hold lasts until SIGINT, SIGTERM, SIGHUP or SIGQUIT, or until it is
//! lost.

use std::ffi::OsString;
use std::io;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::exit::{self, CliError};

/// What a duration too long for the clock to add counts as: longer than any wait.
pub(crate) const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `d` from now, or a century from now if that overflows the clock (`--timeout` given a
/// huge value).
pub(crate) fn deadline_after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d).unwrap_or_else(|| now + CENTURY)
}

/// How often the group is checked for survivors while the grace period runs.
const GROUP_POLL: Duration = Duration::from_millis(20);

/// On SIGCONT after a stop, how long the hold's watchers get to report what happened while
/// `baton` was stopped (a deleted key, a revoked lease) before CMD's group is continued.
const RESUME_SETTLE: Duration = Duration::from_millis(100);

/// SIGINT, SIGTERM, SIGHUP (a closed terminal or ssh session) and SIGQUIT, caught from
/// the start of a command so that an interrupted `baton` always cleans up (withdraws its
/// waiter key, releases, forwards to CMD) instead of dying with the lock held.
///
/// A signal ignored when `baton` started (`nohup` ignores SIGHUP; a non-interactive shell
/// starts background jobs with SIGINT and SIGQUIT ignored; `trap '' INT`) is not caught: it
/// stays ignored, by `baton` and by CMD, which inherits it ignored, as with any command.
#[derive(Debug)]
pub(crate) struct Signals {
    interrupt: Option<Signal>,
    terminate: Option<Signal>,
    hangup: Option<Signal>,
    quit: Option<Signal>,
    /// SIGUSR1 and SIGUSR2: only forwarded to CMD (see [`Signals::recv_forwarded`]); caught
    /// from the start so that they never kill `baton` (their default action), which left
    /// the lock held until its lease expired.
    user1: Option<Signal>,
    user2: Option<Signal>,
}

impl Signals {
    /// Start catching SIGINT, SIGTERM, SIGHUP and SIGQUIT, those not ignored. SIGUSR1 and
    /// SIGUSR2 keep their default action (they end `baton`): see
    /// [`forwarding`](Signals::forwarding).
    pub(crate) fn new() -> Result<Self, CliError> {
        Self::catching(false)
    }

    /// As [`new`](Signals::new), and SIGUSR1 and SIGUSR2 too (those not ignored), for the
    /// commands that run a CMD and forward them to it (`lock`, `elect`, `sem`).
    pub(crate) fn forwarding() -> Result<Self, CliError> {
        Self::catching(true)
    }

    fn catching(user: bool) -> Result<Self, CliError> {
        let catch = |kind: SignalKind| {
            if ignored(kind.as_raw_value()) {
                return Ok(None);
            }
            signal(kind)
                .map(Some)
                .map_err(|e| CliError::failed(format!("cannot catch signals: {e}")))
        };
        Ok(Signals {
            interrupt: catch(SignalKind::interrupt())?,
            terminate: catch(SignalKind::terminate())?,
            hangup: catch(SignalKind::hangup())?,
            quit: catch(SignalKind::quit())?,
            user1: if user {
                catch(SignalKind::user_defined1())?
            } else {
                None
            },
            user2: if user {
                catch(SignalKind::user_defined2())?
            } else {
                None
            },
        })
    }

    /// The next signal to forward to CMD: those of [`recv`](Signals::recv), and SIGUSR1
    /// and SIGUSR2.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe, as [`recv`](Signals::recv).
    pub(crate) async fn recv_forwarded(&mut self) -> i32 {
        self.next_signal(true).await
    }

    /// The next of those signals: its number.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a signal that arrives meanwhile is kept for the next call.
    pub(crate) async fn recv(&mut self) -> i32 {
        self.next_signal(false).await
    }

    /// The next caught signal, SIGUSR1 and SIGUSR2 included if `user`. Cancel safe.
    async fn next_signal(&mut self, user: bool) -> i32 {
        tokio::select! {
            Some(()) = next(&mut self.interrupt) => libc::SIGINT,
            Some(()) = next(&mut self.terminate) => libc::SIGTERM,
            Some(()) = next(&mut self.hangup) => libc::SIGHUP,
            Some(()) = next(&mut self.quit) => libc::SIGQUIT,
            Some(()) = next(&mut self.user1), if user => libc::SIGUSR1,
            Some(()) = next(&mut self.user2), if user => libc::SIGUSR2,
            else => std::future::pending().await,
        }
    }

    /// Run `work`, or give up with the interrupted exit code (128+N) when a signal comes
    /// first. `work` must be cancel safe.
    pub(crate) async fn interruptible<T>(
        &mut self,
        work: impl std::future::Future<Output = Result<T, CliError>>,
    ) -> Result<T, CliError> {
        tokio::select! {
            r = work => r,
            sig = self.recv() => {
                tracing::debug!(signal = sig, "interrupted");
                Err(CliError::interrupted(sig))
            }
        }
    }
}

/// The next delivery of `signal`; never, if it is not caught.
///
/// # Cancel safety
///
/// Cancel safe, as [`Signal::recv`].
async fn next(signal: &mut Option<Signal>) -> Option<()> {
    match signal {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}

/// True if `sig` is ignored (SIG_IGN) in this process: it was when `baton` started, since
/// `baton` ignores none itself.
fn ignored(sig: i32) -> bool {
    // SAFETY: sigaction(2) only reads the current action into a struct we own.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(sig, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN
    }
}

/// CMD and how to run it.
#[derive(Debug)]
pub(crate) struct Job {
    /// CMD and its arguments; not empty.
    pub(crate) argv: Vec<OsString>,
    /// Variables added to CMD's environment.
    pub(crate) env: Vec<(&'static str, String)>,
    /// How long CMD's group has between SIGTERM and SIGKILL after a loss.
    pub(crate) grace: Duration,
    /// The session's TTL: where the backend does not tell the hold's deadline, the guardian
    /// counts on a third of it (see [`certain_until`]).
    pub(crate) ttl: Duration,
}

/// How a hold ended.
#[derive(Debug)]
pub(crate) enum Ending {
    /// CMD exited by itself (or after a forwarded signal), with this exit code.
    Exited(u8),
    /// No CMD: `baton` was asked to stop by a signal.
    Stopped,
    /// The hold was lost; CMD's group has been terminated.
    Lost,
}

/// Hold until CMD exits (or, without CMD, until a signal), or until `lost` fires.
///
/// `is_lost` checks the hold right now (its local deadline included); it is asked on
/// SIGCONT after a stop (see [`JobControl`]) before CMD's group is continued. `deadline`
/// gives the hold's local deadline, if the backend tells it: the guardian (see
/// [`Guardian`]) is kept told of it, to end CMD's group by then if `baton` dies.
///
/// `on_lost` is called as soon as the loss is seen, right after CMD's group got SIGTERM and
/// before the grace period: it prints the notice. It is told whether the loss was found
/// while CMD's group was stopped by job control.
///
/// Fails with 127 or 126 if CMD cannot be started; nothing is running then.
pub(crate) async fn hold(
    job: Option<Job>,
    lost: CancellationToken,
    is_lost: impl Fn() -> bool,
    deadline: impl Fn() -> Option<Instant>,
    signals: &mut Signals,
    on_lost: impl FnOnce(bool),
) -> Result<Ending, CliError> {
    let Some(job) = job else {
        return Ok(tokio::select! {
            _ = signals.recv() => Ending::Stopped,
            _ = lost.cancelled() => {
                on_lost(false);
                Ending::Lost
            }
        });
    };
    if lost.is_cancelled() {
        // Lost before CMD started: never start it.
        on_lost(false);
        return Ok(Ending::Lost);
    }
    let mut job_control = JobControl::new()?;
    let mut child = spawn(&job)?;
    let Some(pgid) = child.id().and_then(|id| i32::try_from(id).ok()) else {
        return Err(CliError::failed(
            "CMD exited before its process id was known",
        ));
    };
    job_control.watch(pgid);
    tracing::debug!(pgid, "CMD started");
    let certain = || certain_until(&deadline, &is_lost, job.ttl);
    let mut guardian = Guardian::start(pgid, job.grace, certain());
    let running = Running {
        child: &mut child,
        pgid,
        grace: job.grace,
        guardian: &guardian,
    };
    let ending = tokio::select! {
        ending = running.supervise(&lost, &is_lost, signals, &mut job_control, on_lost) => ending,
        never = guardian.keep_told(&certain) => match never {},
    };
    guardian.quit().await;
    ending
}

/// Until when the hold is certain, for the guardian: its local deadline; where the backend
/// does not tell it, a third of the TTL from now while the hold is not lost (keep-alives
/// and extends are sent every TTL/3, so the hold outlives that unless they have been
/// failing for a while); `None` once it is lost.
fn certain_until(
    deadline: &impl Fn() -> Option<Instant>,
    is_lost: &impl Fn() -> bool,
    ttl: Duration,
) -> Option<Instant> {
    deadline().or_else(|| (!is_lost()).then(|| Instant::now() + ttl / 3))
}

/// CMD, started as process group `pgid`, while [`hold`] runs it.
struct Running<'a> {
    child: &'a mut Child,
    pgid: i32,
    grace: Duration,
    guardian: &'a Guardian,
}

impl Running<'_> {
    /// Until CMD exits (and the rest of its group after it) or the hold is lost.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: dropped, it leaves CMD's group to the guardian's SIGKILL, or
    /// running if there is no guardian. [`hold`] drops it only when it returns.
    async fn supervise(
        self,
        lost: &CancellationToken,
        is_lost: &impl Fn() -> bool,
        signals: &mut Signals,
        job_control: &mut JobControl,
        on_lost: impl FnOnce(bool),
    ) -> Result<Ending, CliError> {
        let Running {
            child,
            pgid,
            grace,
            guardian,
        } = self;
        loop {
            tokio::select! {
                status = child.wait() => {
                    let status = status
                        .map_err(|e| CliError::failed(format!("cannot wait for CMD: {e}")))?;
                    tracing::debug!(?status, "CMD exited");
                    if group_alive(pgid) {
                        // Background jobs CMD left in its group are part of the job: they
                        // end before the hold does.
                        tracing::debug!(pgid, "ending what CMD left running in its group");
                        kill_group(pgid, libc::SIGTERM);
                        terminate(child, pgid, grace).await;
                    }
                    return Ok(Ending::Exited(exit_code(status)));
                }
                sig = signals.recv_forwarded() => {
                    tracing::debug!(signal = sig, pgid, "forwarding signal to CMD");
                    // A group stopped otherwise than by our job control (CMD read from the
                    // terminal: SIGTTIN; a `kill -STOP`) would keep the signal pending for
                    // ever, and the hold with it: continue it, as shells do. One stopped by
                    // our job control is continued by `resume`, once the hold is checked.
                    let ending = !matches!(sig, libc::SIGUSR1 | libc::SIGUSR2);
                    if !ending {
                        kill_group(pgid, sig);
                    } else if CMD_STOPPED.load(Ordering::SeqCst) {
                        signal_tree(pgid, &[sig]);
                    } else {
                        // What ends CMD reaches the groups apart too, as on a loss: an outer
                        // `baton` leaves what is below a nested one to the nested one's
                        // forwarding (a `setsid` child of a nested CMD ran on after a loss
                        // of the outer lock: found by review).
                        signal_tree(pgid, &[sig, libc::SIGCONT]);
                    }
                }
                () = job_control.continued() => {
                    if job_control.resume(lost, is_lost, pgid).await {
                        continue;
                    }
                    end_lost(child, pgid, grace, guardian, on_lost, true).await;
                    return Ok(Ending::Lost);
                }
                _ = lost.cancelled() => {
                    let stopped = job_control.take_stopped();
                    end_lost(child, pgid, grace, guardian, on_lost, stopped).await;
                    return Ok(Ending::Lost);
                }
            }
        }
    }
}

/// After a loss: SIGTERM to CMD's group (and SIGCONT, so that a stopped group gets it at
/// once), the notice, then SIGKILL once `grace` has passed. The guardian is told first, so
/// that it SIGKILLs the group at the same time if `baton` dies meanwhile.
async fn end_lost(
    child: &mut Child,
    pgid: i32,
    grace: Duration,
    guardian: &Guardian,
    on_lost: impl FnOnce(bool),
    stopped: bool,
) {
    guardian.tell_lost(deadline_after(grace));
    // What left the group gets SIGTERM too, found while its parents live (a `setsid` child
    // of CMD: found by review); not below a nested `baton`, which forwards it.
    term_tree(pgid);
    on_lost(stopped);
    terminate(child, pgid, grace).await;
}

/// CMD's process group, while [`hold`] runs it: what the stop handler stops. 0 when none;
/// [`SPAWNING`] while CMD is being started, [`STOP_PENDING`] if a stop signal came then.
static CMD_GROUP: AtomicI32 = AtomicI32::new(0);

/// [`CMD_GROUP`] while CMD is being started: it may already run, but its group is not
/// known yet.
const SPAWNING: i32 = -1;

/// [`CMD_GROUP`] when a stop signal came while CMD was being started: `baton` stops CMD's
/// group and itself as soon as the group is known.
const STOP_PENDING: i32 = -2;

/// True once the stop handler stopped CMD's group, until `baton` has checked the hold and
/// continued it (or ended it).
static CMD_STOPPED: AtomicBool = AtomicBool::new(false);

/// Job control for CMD's process group, which is not `baton`'s: a terminal's Ctrl-Z
/// (SIGTSTP) reaches only `baton`. Left to the default action, it would stop `baton` alone,
/// and CMD would run on while no keep-alive is sent: the lease would expire and another
/// process would take the hold while CMD still runs.
///
/// So SIGTSTP, SIGTTIN and SIGTTOU are caught (unless they were ignored when `baton`
/// started) by a handler that sends SIGSTOP to CMD's group, then SIGSTOP to `baton` itself.
/// On SIGCONT (`fg`, `bg`, `kill -CONT`), `baton` lets the hold's watchers catch up (at most
/// [`RESUME_SETTLE`]), then checks the hold: still held, it continues CMD's group; lost
/// while stopped, it ends the group as after any loss (exit 122).
#[derive(Debug)]
struct JobControl {
    continued: Signal,
}

impl JobControl {
    /// Catch SIGCONT, and install the stop handler (once per process). Call it right
    /// before starting CMD: a stop signal from now until [`watch`](JobControl::watch) is
    /// held back until CMD's group is known.
    fn new() -> Result<Self, CliError> {
        let continued = signal(SignalKind::from_raw(libc::SIGCONT))
            .map_err(|e| CliError::failed(format!("cannot catch signals: {e}")))?;
        install_stop_handler();
        CMD_STOPPED.store(false, Ordering::SeqCst);
        CMD_GROUP.store(SPAWNING, Ordering::SeqCst);
        Ok(JobControl { continued })
    }

    /// CMD started as group `pgid`: from now on, stop signals stop it before `baton`. A
    /// stop signal that came while CMD was being started takes effect now.
    fn watch(&mut self, pgid: i32) {
        if CMD_GROUP.swap(pgid, Ordering::SeqCst) == STOP_PENDING {
            tracing::debug!(pgid, "stop signal while CMD was starting: stopping now");
            stop(pgid);
        }
    }

    /// The next SIGCONT.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a SIGCONT that arrives meanwhile is kept for the next call.
    async fn continued(&mut self) {
        if self.continued.recv().await.is_none() {
            std::future::pending::<()>().await;
        }
    }

    /// True (and cleared) if the stop handler stopped CMD's group.
    fn take_stopped(&self) -> bool {
        CMD_STOPPED.swap(false, Ordering::SeqCst)
    }

    /// After SIGCONT: if the handler stopped CMD's group, check the hold and continue the
    /// group if it is still held. False if it was lost (the group is still stopped then).
    async fn resume(
        &mut self,
        lost: &CancellationToken,
        is_lost: &impl Fn() -> bool,
        pgid: i32,
    ) -> bool {
        while CMD_STOPPED.load(Ordering::SeqCst) {
            // What arrived while baton was stopped (a watch event, a keep-alive answer)
            // is read now: give it a moment to cancel `lost`.
            let _ = tokio::time::timeout(RESUME_SETTLE, lost.cancelled()).await;
            CMD_STOPPED.store(false, Ordering::SeqCst);
            if lost.is_cancelled() || is_lost() {
                tracing::debug!(pgid, "hold lost while stopped");
                return false;
            }
            tracing::debug!(pgid, "still held after a stop: continuing CMD");
            kill_group(pgid, libc::SIGCONT);
            tell_guardian(b"R\n");
            // Stopped again meanwhile: check again before the next SIGCONT is handled.
        }
        true
    }
}

impl Drop for JobControl {
    fn drop(&mut self) {
        // The handler now stops only `baton`, as the default action would.
        let pending = CMD_GROUP.swap(0, Ordering::SeqCst) == STOP_PENDING;
        CMD_STOPPED.store(false, Ordering::SeqCst);
        if pending {
            // CMD could not be started: the stop is `baton`'s alone.
            stop(0);
        }
    }
}

/// Install [`on_stop_signal`] for SIGTSTP, SIGTTIN and SIGTTOU, once; a signal ignored when
/// `baton` started (a non-interactive shell's background job) stays ignored.
fn install_stop_handler() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        for sig in [libc::SIGTSTP, libc::SIGTTIN, libc::SIGTTOU] {
            // SAFETY: sigaction with structs we own, zero-initialised as C expects; the
            // handler calls only async-signal-safe functions (see `on_stop_signal`).
            unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, std::ptr::null(), &mut old) != 0
                    || old.sa_sigaction == libc::SIG_IGN
                {
                    continue;
                }
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_stop_signal as extern "C" fn(libc::c_int) as usize;
                action.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut action.sa_mask);
                for blocked in [libc::SIGTSTP, libc::SIGTTIN, libc::SIGTTOU] {
                    libc::sigaddset(&mut action.sa_mask, blocked);
                }
                if libc::sigaction(sig, &action, std::ptr::null_mut()) != 0 {
                    tracing::warn!(
                        signal = sig,
                        error = %io::Error::last_os_error(),
                        "cannot catch a stop signal; it stops baton alone"
                    );
                }
            }
        }
    });
}

/// The stop handler: SIGSTOP to CMD's group (if one runs), then to `baton`. Returns once
/// `baton` is continued; SIGCONT's own handler then wakes [`JobControl::continued`]. While
/// CMD is being started, it only marks the stop as pending (see [`JobControl::watch`]).
extern "C" fn on_stop_signal(_signal: libc::c_int) {
    // SAFETY: errno is thread-local, and reading and restoring it is what a handler must do.
    let (errno, saved) = unsafe {
        let errno = errno_location();
        (errno, *errno)
    };
    // Only lock-free atomics and async-signal-safe calls (kill, getpid) from here on.
    if !job_control_applies() {
        // Nobody could continue us: ignore it, as the kernel ignores stop signals sent to
        // an orphaned process group (a service, a setsid or cron job). CMD and the
        // keep-alives run on.
        // SAFETY: as above.
        unsafe { *errno = saved };
        return;
    }
    let pgid = loop {
        match CMD_GROUP.load(Ordering::SeqCst) {
            SPAWNING => {
                if CMD_GROUP
                    .compare_exchange(SPAWNING, STOP_PENDING, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                {
                    break None;
                }
            }
            STOP_PENDING => break None,
            pgid => break Some(pgid),
        }
    };
    if let Some(pgid) = pgid {
        stop(pgid);
    }
    // SAFETY: as above.
    unsafe { *errno = saved };
}

/// True if a stop of `baton` can be undone: `baton` is the foreground job of its
/// controlling terminal (a Ctrl-Z), or its parent is in the same session but another process
/// group (a shell's job, or a test harness, that can send SIGCONT). False for a process
/// group the kernel calls orphaned, whose stop signals it discards: `baton` started by
/// `setsid`, systemd or cron. (Only `baton`'s own parent is looked at, not every member of
/// its group.) Async-signal-safe: open, tcgetpgrp, close and the get*id calls only.
fn job_control_applies() -> bool {
    // SAFETY: system calls with no memory-safety preconditions; the path is NUL-terminated.
    unsafe {
        let own = libc::getpgrp();
        let tty = libc::open(
            c"/dev/tty".as_ptr(),
            libc::O_RDONLY | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        if tty >= 0 {
            let foreground = libc::tcgetpgrp(tty);
            libc::close(tty);
            if foreground == own {
                return true;
            }
        }
        let parent = libc::getppid();
        let session = libc::getsid(0);
        session >= 0 && libc::getsid(parent) == session && libc::getpgid(parent) != own
    }
}

/// Stop CMD's group `pgid` (if positive), then `baton` itself; returns once `baton` is
/// continued. Async-signal-safe.
fn stop(pgid: i32) {
    if pgid > 0 {
        CMD_STOPPED.store(true, Ordering::SeqCst);
        // The guardian leaves a group stopped with `baton` to `baton`.
        tell_guardian(b"S\n");
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(-pgid, libc::SIGSTOP) };
    }
    // SAFETY: kill(2) and getpid(2) have no memory-safety preconditions.
    unsafe { libc::kill(libc::getpid(), libc::SIGSTOP) };
}

#[cfg(any(target_os = "linux", target_os = "android"))]
unsafe fn errno_location() -> *mut libc::c_int {
    libc::__errno_location()
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
unsafe fn errno_location() -> *mut libc::c_int {
    libc::__error()
}

/// How a hold that was released ended (see [`hold_and_release`]); `released` is true if
/// the release succeeded.
#[derive(Debug)]
pub(crate) enum Released {
    /// CMD exited by itself (or after a forwarded signal), with this exit code.
    Exited { code: u8, released: bool },
    /// No CMD: stopped by a signal.
    Stopped { released: bool },
}

/// Something held while CMD runs: a lock's guard, a semaphore's permit.
pub(crate) trait Holding {
    /// Cancelled when the hold is lost.
    fn lost_token(&self) -> CancellationToken;
    /// True once the hold is lost, its local deadline included.
    fn is_lost(&self) -> bool;
    /// Why the hold was lost, if it was.
    fn lost_reason(&self) -> Option<String>;
    /// Its local deadline, if the backend tells it (see `Guard::deadline`).
    fn deadline(&self) -> Option<Instant>;
    /// Release it.
    fn release(self) -> impl std::future::Future<Output = baton::Result<()>>;
}

/// A lock's guard or a leadership (`Box<dyn Guard>`, `Box<dyn Leading>`).
impl<T: baton::coordinator::Guard + ?Sized + 'static> Holding for Box<T> {
    fn lost_token(&self) -> CancellationToken {
        self.as_ref().lost_token()
    }
    fn is_lost(&self) -> bool {
        self.as_ref().is_lost()
    }
    fn lost_reason(&self) -> Option<String> {
        self.as_ref().lost_reason()
    }
    fn deadline(&self) -> Option<Instant> {
        self.as_ref().deadline()
    }
    fn release(self) -> impl std::future::Future<Output = baton::Result<()>> {
        T::release(self)
    }
}

impl Holding for baton::SemaphorePermit {
    fn lost_token(&self) -> CancellationToken {
        baton::SemaphorePermit::lost_token(self)
    }
    fn is_lost(&self) -> bool {
        baton::SemaphorePermit::is_lost(self)
    }
    fn lost_reason(&self) -> Option<String> {
        baton::SemaphorePermit::lost_reason(self)
    }
    fn deadline(&self) -> Option<Instant> {
        Some(self.session().deadline())
    }
    fn release(self) -> impl std::future::Future<Output = baton::Result<()>> {
        baton::SemaphorePermit::release(self)
    }
}

/// [`hold`], then release `held` within [`cli::RELEASE_TIMEOUT`](crate::cli::RELEASE_TIMEOUT):
/// the whole life of something held while CMD runs. `what` names it in notices ("the
/// permit"). A loss is reported once by `on_lost` (given why: the hold's reason, or the
/// release's error; and whether it was found while CMD was stopped by job control) and
/// gives 122, also when it is found only after CMD exited; a release that fails otherwise
/// is only a notice, since the session's lease ends it anyway.
pub(crate) async fn hold_and_release<G: Holding>(
    held: G,
    job: Option<Job>,
    signals: &mut Signals,
    what: &str,
    on_lost: impl FnOnce(Option<String>, bool),
) -> Result<Released, CliError> {
    let lost = held.lost_token();
    let mut on_lost = Some(on_lost);
    let mut report = |reason: Option<String>, stopped: bool| {
        if let Some(f) = on_lost.take() {
            f(reason, stopped);
        }
    };
    let ending = hold(
        job,
        lost.clone(),
        || held.is_lost(),
        || held.deadline(),
        signals,
        |stopped| report(held.lost_reason(), stopped),
    )
    .await;
    if let Ok(Ending::Lost) = ending {
        return Err(CliError::quiet(exit::LOST));
    }
    // Lost while CMD was finishing, before anyone said so.
    let lost_before = lost.is_cancelled();
    if lost_before {
        report(held.lost_reason(), false);
    }
    let released = tokio::time::timeout(crate::cli::RELEASE_TIMEOUT, held.release()).await;
    let lost_at_release = released_lost(&released);
    match &released {
        Ok(Ok(())) => tracing::info!("{what} released"),
        // The release found it was not ours any more (a loss nobody had seen yet).
        Ok(Err(e)) if lost_at_release => report(Some(e.to_string()), false),
        Ok(Err(e)) => crate::output::notice(&format!("baton: releasing {what}: {e}")),
        Err(_) => crate::output::notice(&format!(
            "baton: releasing {what} timed out; it expires with its lease"
        )),
    }
    let ending = ending?;
    if lost_before || lost_at_release {
        return Err(CliError::quiet(exit::LOST));
    }
    let released = matches!(released, Ok(Ok(())));
    match ending {
        Ending::Exited(code) => Ok(Released::Exited { code, released }),
        Ending::Stopped => Ok(Released::Stopped { released }),
        Ending::Lost => Err(CliError::quiet(exit::LOST)),
    }
}

/// True if a release (within its timeout) failed because the hold was no longer ours.
fn released_lost<E>(released: &Result<baton::Result<()>, E>) -> bool {
    matches!(released, Ok(Err(e)) if e.is_lost())
}

/// A small process that outlives `baton` to end CMD's whole process group if `baton` dies
/// (`kill -9`): `PR_SET_PDEATHSIG` reaches only CMD itself, not the background jobs CMD
/// started, which would go on without the lock. The guardian is `baton` itself, run with a
/// hidden first argument (see [`guardian_main`]), in a process group of its own so that
/// terminal signals do not reach it. Dropping this handle (every way `hold` ends) kills the
/// guardian with SIGKILL, which makes it do nothing: CMD's group is then `baton`'s to end.
///
/// Its stdin is a pipe from `baton`, on which `baton` tells it until when the hold is
/// certain (its local deadline, re-read every [`TELL_EVERY`]) and, after a loss, when
/// `baton` will SIGKILL CMD's group (see [`Word`]). `baton`'s death closes the pipe: the
/// guardian then sends the group SIGTERM, and SIGKILL after `--grace` but no later than
/// the hold's deadline (less [`DEADLINE_MARGIN`]): after that, the lease may expire at the
/// server and the next holder start, and CMD must not run beside it. For the same reason,
/// if the deadline comes near while `baton` is stopped (SIGSTOP of `baton` alone: no
/// keep-alive is sent), the guardian SIGKILLs the group then (see [`must_end_now`]).
///
/// If the guardian cannot be started, `baton` says so in its trace and goes on: CMD itself
/// still dies with `baton` (SIGTERM only).
struct Guardian {
    child: Option<std::process::Child>,
    /// The write end of the guardian's stdin, non-blocking; also in [`GUARDIAN_LINK`]. Never
    /// closed before `baton` exits: closed while the guardian lives, it would be taken for
    /// `baton`'s death, and the stop handler may still write to it (a `hold` runs once per
    /// process).
    link: Option<std::os::fd::RawFd>,
    /// The deadline last told (CLOCK_MONOTONIC nanoseconds), not to tell it again.
    told: std::cell::Cell<Option<u64>>,
}

/// The hidden first argument that makes `baton` a guardian: `baton __baton-guardian PGID
/// GRACE_MS PARENT_PID CERTAIN_NS` (CERTAIN_NS: the first `D` word, or 0 for none; see
/// [`Word`]).
pub(crate) const GUARDIAN_ARG: &str = "__baton-guardian";

/// How often `baton` looks whether the hold's deadline moved, to tell the guardian. A
/// deadline told late is an earlier one: the guardian errs on the safe side.
const TELL_EVERY: Duration = Duration::from_millis(250);

/// How long before the hold's deadline the guardian SIGKILLs CMD's group once `baton` is
/// gone or stopped: room for a sleep that wakes late on a busy machine.
const DEADLINE_MARGIN: Duration = Duration::from_millis(100);

/// Once the hold's deadline is near without newer word from `baton`, how often the guardian
/// looks whether `baton` is stopped.
const STALLED_POLL: Duration = Duration::from_millis(50);

/// How long past the hold's deadline the guardian waits for word from a `baton` that is not
/// stopped (it sends the loss at once), before it takes `baton` for hung and SIGKILLs CMD's
/// group itself.
const STALLED_SETTLE: Duration = Duration::from_secs(1);

impl Guardian {
    /// Start the guardian of group `pgid`, telling it `certain` (see [`certain_until`]).
    ///
    /// It is in charge from its start: until then (a few milliseconds after CMD's), a
    /// `baton` killed leaves CMD to its death signal (SIGTERM) and background jobs running,
    /// and a `baton` stopped leaves CMD running.
    fn start(pgid: i32, grace: Duration, certain: Option<Instant>) -> Guardian {
        // /proc/self/exe, not `current_exe()`: once the binary is replaced on disk (an
        // upgrade), the path that gives is `…/baton (deleted)`, which cannot be run.
        let exe = if cfg!(target_os = "linux") {
            Ok(std::path::PathBuf::from("/proc/self/exe"))
        } else {
            std::env::current_exe()
        };
        let started = exe.and_then(|exe| {
            let mut command = std::process::Command::new(exe);
            // SAFETY: getpid is async-signal-safe and touches no memory.
            let parent = unsafe { libc::getpid() };
            command
                .arg(GUARDIAN_ARG)
                .arg(pgid.to_string())
                .arg(grace.as_millis().min(u128::from(u64::MAX)).to_string())
                .arg(parent.to_string())
                // As an argument, not a line: the guardian has it even if `baton` stops
                // before it could write a line.
                .arg(certain.map_or(0, mono_ns).to_string())
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .env_remove("BATON_PASSWORD");
            std::os::unix::process::CommandExt::process_group(&mut command, 0);
            // `ps` shows `baton __baton-guardian …`, not `/proc/self/exe …`.
            std::os::unix::process::CommandExt::arg0(&mut command, "baton");
            command.spawn()
        });
        match started {
            Ok(mut child) => {
                tracing::debug!(pgid, guardian = child.id(), "guardian started");
                let link = child.stdin.take().map(|stdin| {
                    let link = std::os::fd::IntoRawFd::into_raw_fd(stdin);
                    set_nonblocking(link);
                    GUARDIAN_LINK.store(link, Ordering::SeqCst);
                    link
                });
                Guardian {
                    child: Some(child),
                    link,
                    told: std::cell::Cell::new(certain.map(mono_ns)),
                }
            }
            Err(e) => {
                tracing::warn!(pgid, error = %e, "cannot start the guardian; CMD still dies with baton");
                Guardian {
                    child: None,
                    link: None,
                    told: std::cell::Cell::new(None),
                }
            }
        }
    }

    /// Write one line to the guardian; true if it was written. Never blocks: a line of at
    /// most `PIPE_BUF` bytes is written whole or not at all, and a guardian that does not
    /// read (or is gone) is no reason to stop.
    fn tell(&self, line: &str) -> bool {
        self.link
            .is_some_and(|link| write_line(link, line.as_bytes()))
    }

    /// Tell the guardian that the hold is certain until `at`, if that is news.
    fn tell_certain(&self, at: Option<Instant>) {
        let Some(at) = at else { return };
        let ns = mono_ns(at);
        if self.told.get() != Some(ns) && self.tell(&format!("D {ns}\n")) {
            self.told.set(Some(ns));
        }
    }

    /// Tell the guardian that the hold is lost and that `baton` SIGKILLs CMD's group at
    /// `kill_at`.
    fn tell_lost(&self, kill_at: Instant) {
        self.tell(&format!("L {}\n", mono_ns(kill_at)));
    }

    /// Keep the guardian told of `certain()` (see [`certain_until`]); never returns.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only reads and writes the pipe.
    async fn keep_told(&self, certain: &impl Fn() -> Option<Instant>) -> std::convert::Infallible {
        if self.link.is_none() {
            return std::future::pending().await;
        }
        loop {
            tokio::time::sleep(TELL_EVERY).await;
            self.tell_certain(certain());
        }
    }
}

/// How long `baton`, as the hold ends, waits for the guardian to take its leave (`Q`; see
/// [`Word`]) before it kills it: room for the guardian's walks of /proc on a busy machine.
const GUARDIAN_QUIT_WAIT: Duration = Duration::from_secs(2);

impl Guardian {
    /// As the hold ends: ask the guardian to quit (`Q`), and give it up to
    /// [`GUARDIAN_QUIT_WAIT`] to exit; `Drop` kills it after. Asked, not killed: it reads the
    /// words before this one first, and continues the groups apart it stopped on an `S` (a
    /// guardian killed while it walked /proc on a Ctrl-Z, before it read `R`, left a
    /// `setsid` daemon of CMD stopped for ever after `baton` exited: found by review).
    ///
    /// Waited for on the runtime, not in `Drop`: `baton`'s runtime has one thread, and a
    /// blocking wait there sent no keep-alive meanwhile (a guardian slow to quit made a
    /// short TTL pass, and a hold whose CMD had finished was told lost: found by review).
    async fn quit(&mut self) {
        GUARDIAN_LINK.store(-1, Ordering::SeqCst);
        if self.child.is_none() || !self.tell("Q\n") {
            return;
        }
        let until = tokio::time::Instant::now() + GUARDIAN_QUIT_WAIT;
        while let Some(child) = self.child.as_mut() {
            if !matches!(child.try_wait(), Ok(None)) || tokio::time::Instant::now() >= until {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

impl Drop for Guardian {
    fn drop(&mut self) {
        GUARDIAN_LINK.store(-1, Ordering::SeqCst);
        if let Some(mut child) = self.child.take() {
            // See `quit`, which gave it its chance to exit first.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The guardian's pipe (see [`Guardian::link`]) while a guardian runs, for the stop
/// handler and [`JobControl::resume`]; -1 when none.
static GUARDIAN_LINK: AtomicI32 = AtomicI32::new(-1);

/// Write `line` (at most `PIPE_BUF` bytes: whole or not at all) to the non-blocking pipe
/// `fd`; true if written. Async-signal-safe.
fn write_line(fd: i32, line: &[u8]) -> bool {
    // SAFETY: write(2) from a buffer we own, of its length.
    let written = unsafe { libc::write(fd, line.as_ptr().cast(), line.len()) };
    usize::try_from(written) == Ok(line.len())
}

/// Tell the guardian, if one runs, `line` (see [`Word`]). Async-signal-safe.
fn tell_guardian(line: &[u8]) {
    let fd = GUARDIAN_LINK.load(Ordering::SeqCst);
    if fd >= 0 {
        write_line(fd, line);
    }
}

/// Make writes to `fd` return at once instead of blocking.
fn set_nonblocking(fd: std::os::fd::RawFd) {
    // SAFETY: fcntl on a descriptor we own, with no pointers.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
}

/// CLOCK_MONOTONIC now, in nanoseconds: on Linux, the clock of std's and tokio's `Instant`,
/// and one the guardian (another process) reads too.
fn mono_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only to the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(ts.tv_nsec).unwrap_or(0))
}

/// `at` on CLOCK_MONOTONIC, in nanoseconds (see [`mono_now_ns`]).
fn mono_ns(at: Instant) -> u64 {
    let now = Instant::now();
    let base = mono_now_ns();
    if at >= now {
        base.saturating_add(nanos(at - now))
    } else {
        base.saturating_sub(nanos(now - at))
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// What `baton` told its guardian: one line per message, times in CLOCK_MONOTONIC
/// nanoseconds.
/// - `D NS`: the hold is certain until NS (its local deadline).
/// - `L NS`: the hold is lost; `baton` sent CMD's group SIGTERM and SIGKILLs it at NS (the
///   end of `--grace`). `D` lines after it are ignored.
/// - `S`: `baton`'s stop handler is stopping CMD's group, then `baton` (job control).
/// - `R`: `baton` continued CMD's group after such a stop (so does any other line).
/// - `Q`: the hold is over and CMD's group gone: continue what was stopped on an `S`, and
///   exit.
#[derive(Debug, Default)]
struct Word {
    certain_until: Option<u64>,
    lost_until: Option<u64>,
    /// Since an `S`: CMD's group was stopped along with `baton`.
    job_stopped: bool,
    /// A `Q` came.
    quit: bool,
    /// The start of a line not yet complete.
    partial: Vec<u8>,
}

impl Word {
    /// Take in what was read from the pipe.
    fn hear(&mut self, bytes: &[u8]) {
        self.partial.extend_from_slice(bytes);
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            self.line(&line[..end]);
        }
        if self.partial.len() > 64 {
            // No line is that long: not ours.
            self.partial.clear();
        }
    }

    fn line(&mut self, line: &[u8]) {
        let text = std::str::from_utf8(line).unwrap_or_default();
        self.job_stopped = text == "S";
        self.quit |= text == "Q";
        let Some((kind, ns)) = text.split_once(' ') else {
            return;
        };
        let Ok(ns) = ns.parse::<u64>() else {
            return;
        };
        match kind {
            "D" if self.lost_until.is_none() => self.certain_until = Some(ns),
            "L" => self.lost_until = Some(ns),
            _ => {}
        }
    }

    /// When CMD's group must be gone at the latest, once `baton` cannot end it itself.
    fn kill_by(&self) -> Option<u64> {
        self.lost_until.or(self.certain_until)
    }
}

/// The guardian process (see [`Guardian`]): read `baton`'s word (PARENT_PID's) on stdin,
/// without looking at CMD's group meanwhile (`baton` ends the guardian when the hold ends).
/// At the end of stdin (`baton` is gone), send the group SIGTERM, and SIGKILL once GRACE_MS
/// have passed or the hold's deadline is near, whichever comes first. If the deadline comes
/// near while `baton` lives but is stopped (or past it, hung), SIGKILL the group at once
/// (see [`must_end_now`]). Exits when the group is gone. Never returns.
#[cfg(target_os = "linux")]
pub(crate) fn guardian_main(args: &[String]) -> ! {
    let parse = |i: usize| args.get(i).and_then(|a| a.parse::<i32>().ok());
    // GRACE_MS up to u64::MAX (`--grace` has no upper bound): an i64 refused the largest,
    // and the guardian exited at once.
    let grace_ms = args.get(1).and_then(|a| a.parse::<u64>().ok());
    let (Some(pgid), Some(grace_ms), Some(parent)) = (parse(0), grace_ms, parse(2)) else {
        std::process::exit(i32::from(exit::FAILED));
    };
    let grace = Duration::from_millis(grace_ms);
    // Signals a terminal or a dying `baton` sends are no reason to stop watching: only the
    // end of the pipe is.
    // SAFETY: plain libc calls on a sigset_t we own; no other thread exists.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    let mut word = Word::default();
    if let Some(Ok(certain @ 1..)) = args.get(3).map(|a| a.parse::<u64>()) {
        word.certain_until = Some(certain);
    }
    let mut buf = [0u8; 512];
    // The groups apart from CMD's that were stopped on an `S`, to continue on the next word.
    let mut stopped_apart: Vec<i32> = Vec::new();
    loop {
        let timeout = match word.kill_by() {
            None => -1,
            Some(by) => {
                let now = mono_now_ns();
                let watch_from = by.saturating_sub(nanos(DEADLINE_MARGIN));
                if now >= watch_from {
                    if must_end_now(&word, by, now, parent, pgid) {
                        end_tree(pgid, libc::SIGKILL);
                        std::process::exit(0);
                    }
                    millis(STALLED_POLL)
                } else {
                    millis(Duration::from_nanos(watch_from - now)).max(1)
                }
            }
        };
        let mut fds = libc::pollfd {
            fd: 0,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one pollfd we own.
        if unsafe { libc::poll(&mut fds, 1, timeout) } == 0 {
            continue;
        }
        // SAFETY: read(2) into a buffer we own, at most its length.
        let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
        if let Ok(n @ 1..) = usize::try_from(n) {
            let was_stopped = word.job_stopped;
            word.hear(&buf[..n]);
            match (was_stopped, word.job_stopped) {
                // `baton`'s stop handler stops CMD's group (a SIGSTOP, which a nested
                // `baton` in it cannot pass on to its own CMD); what left the group is
                // stopped here, where /proc may be read (found by review: a nested CMD ran
                // on beside the next holder while the outer `baton` was stopped).
                (false, true) => {
                    // A group already stopped (on purpose, by CMD or the user) is not ours
                    // to continue (found by review).
                    // What a group apart starts during the walk is stopped too (found by
                    // review: a process manager's new workers ran on).
                    // A group stopped on purpose may show its leader in `D`, not `T`: a
                    // shell blocked in a `vfork` whose child is stopped (found by review).
                    let stopped = stopped_groups();
                    stopped_apart = stop_groups_apart(pgid, |g| stopped.contains(&g));
                }
                // Continued (or any other word): so is what was stopped here, after its stop.
                (true, false) => {
                    for group in stopped_apart.drain(..) {
                        // SAFETY: kill(2) has no memory-safety preconditions.
                        unsafe { libc::kill(-group, libc::SIGCONT) };
                    }
                }
                _ => {}
            }
            if word.quit {
                std::process::exit(0);
            }
        } else if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        } else {
            // The end of the pipe (or an error reading it, taken alike): `baton` is gone.
            break;
        }
    }
    end_group(pgid, grace, word.kill_by())
}

/// While `baton` lives but its word is due (the hold's deadline, or the end of the grace
/// `baton` gave after a loss, is [`DEADLINE_MARGIN`] away or past, and nothing later came):
/// true if CMD's group must be SIGKILLed now, because `baton` cannot do it in time:
/// - it is stopped (SIGSTOP, a debugger), not by its own job control: the hold can pass to
///   another at any moment and no keep-alive will be sent;
/// - or it runs but has said nothing for [`STALLED_SETTLE`] past the deadline (hung).
///
/// A group stopped by `baton`'s job control along with `baton` (`S`) is left stopped, for
/// `baton` to end on SIGCONT (`lock lost while stopped`), as long as its leader does not
/// run.
#[cfg(target_os = "linux")]
fn must_end_now(word: &Word, by: u64, now: u64, parent: i32, pgid: i32) -> bool {
    if word.job_stopped {
        return !matches!(proc_state(pgid), Some('T' | 't' | 'D'));
    }
    matches!(proc_state(parent), Some('T' | 't')) || now >= by.saturating_add(nanos(STALLED_SETTLE))
}

/// The state letter of process `pid` (`T` when stopped, `t` when stopped by a debugger,
/// `D` in an uninterruptible wait, such as a shell whose vfork child is stopped), from
/// /proc/PID/stat; `None` if it is gone.
#[cfg(target_os = "linux")]
fn proc_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_state_and_group(&stat)?.0.chars().next()
}

/// The process groups none of whose members can run: at least one is stopped (`T`, `t`),
/// and none is running or sleeping (`R`, `S`); a shell blocked in a `vfork` whose child is
/// stopped shows `D`.
#[cfg(target_os = "linux")]
fn stopped_groups() -> std::collections::HashSet<i32> {
    let mut stopped = std::collections::HashSet::new();
    let mut running = std::collections::HashSet::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        match stat_state_and_group(&stat) {
            Some(("T" | "t", group)) => {
                stopped.insert(group);
            }
            Some(("R" | "S", group)) => {
                running.insert(group);
            }
            _ => {}
        }
    }
    stopped.retain(|group| !running.contains(group));
    stopped
}

/// `d` in whole milliseconds, for poll(2).
#[cfg(target_os = "linux")]
fn millis(d: Duration) -> i32 {
    i32::try_from(d.as_millis()).unwrap_or(i32::MAX)
}

/// After `baton`'s death: SIGTERM to CMD's group (SIGCONT too: a group stopped by job
/// control gets it at once), then SIGKILL once `grace` has passed or `kill_by`
/// (CLOCK_MONOTONIC nanoseconds) is [`DEADLINE_MARGIN`] away, unless the group is gone
/// before. Exits.
#[cfg(target_os = "linux")]
fn end_group(pgid: i32, grace: Duration, kill_by: Option<u64>) -> ! {
    term_tree(pgid);
    let mut by = mono_now_ns().saturating_add(nanos(grace));
    if let Some(kill_by) = kill_by {
        by = by.min(kill_by.saturating_sub(nanos(DEADLINE_MARGIN)));
    }
    loop {
        let now = mono_now_ns();
        if now >= by || !group_alive(pgid) {
            break;
        }
        std::thread::sleep(GROUP_POLL.min(Duration::from_nanos(by - now)));
    }
    end_tree(pgid, libc::SIGKILL);
    std::process::exit(0);
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn guardian_main(_args: &[String]) -> ! {
    std::process::exit(0);
}

/// Every variable `baton lock`, `elect` and `sem` set for CMD (each sets some): removed
/// from CMD's environment before its own are added.
const HOLD_VARS: [&str; 7] = [
    "BATON_FENCING_TOKEN",
    "BATON_LOCK_KEY",
    "ETCD_LOCK_KEY",
    "ETCD_LOCK_REV",
    "BATON_ELECTION_KEY",
    "BATON_SEM_KEY",
    "BATON_SEM_PERMITS",
];

/// Start CMD in its own process group.
fn spawn(job: &Job) -> Result<Child, CliError> {
    let Some((program, args)) = job.argv.split_first() else {
        return Err(CliError::failed("no command given"));
    };
    let mut command = Command::new(program);
    command.args(args);
    // A hold's variables left by an outer `baton` (`baton lock a -- baton elect b -- CMD`)
    // are not this hold's: CMD gets none but its own (set after, which wins).
    for var in HOLD_VARS {
        command.env_remove(var);
    }
    command
        .envs(job.env.iter().cloned())
        // The password was for baton; CMD does not get it.
        .env_remove("BATON_PASSWORD")
        .process_group(0);
    die_with_parent(&mut command);
    command.spawn().map_err(|e| spawn_error(program, &e))
}

/// On Linux, have the kernel send CMD SIGTERM when `baton` dies. The signal is tied to the
/// thread that forks, which is the main thread (the runtime is single-threaded), so it fires
/// only when the whole process ends.
#[cfg(target_os = "linux")]
fn die_with_parent(command: &mut Command) {
    // SAFETY: getpid is async-signal-safe and touches no memory.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure calls only async-signal-safe functions (prctl, getppid) and
    // allocates nothing, as pre_exec requires.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(io::Error::last_os_error());
            }
            // baton may have died before prctl took effect.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_command: &mut Command) {}

/// 127 for a missing CMD, 126 for one that cannot be executed.
fn spawn_error(program: &OsString, e: &io::Error) -> CliError {
    let name = program.to_string_lossy();
    match e.kind() {
        io::ErrorKind::NotFound => {
            CliError::new(exit::NOT_FOUND, format!("{name}: command not found"))
        }
        io::ErrorKind::PermissionDenied => CliError::new(
            exit::CANNOT_EXECUTE,
            format!("{name}: cannot execute: permission denied"),
        ),
        _ => CliError::new(exit::CANNOT_EXECUTE, format!("{name}: cannot execute: {e}")),
    }
}

/// CMD's exit code, or 128+N if a signal killed it.
pub(crate) fn exit_code(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code & 0xff).unwrap_or(exit::FAILED),
        (None, Some(sig)) => exit::signalled(sig),
        (None, None) => exit::FAILED,
    }
}

/// After SIGTERM: wait for CMD and the rest of its group until `grace` has passed, then
/// SIGKILL whatever is left, and reap CMD.
async fn terminate(child: &mut Child, pgid: i32, grace: Duration) {
    // --grace takes any duration humantime parses (up to u64::MAX seconds), which the
    // clock cannot always add: a grace too long to add is as good as a century.
    let deadline = deadline_after(grace);
    if tokio::time::timeout_at(deadline, child.wait())
        .await
        .is_ok()
    {
        // CMD is gone; wait for the rest of its group (background jobs it started).
        while group_alive(pgid) && Instant::now() < deadline {
            tokio::time::sleep(GROUP_POLL).await;
        }
        if !group_alive(pgid) {
            return;
        }
    }
    tracing::debug!(pgid, ?grace, "grace period over: SIGKILL");
    end_tree(pgid, libc::SIGKILL);
    let _ = child.wait().await;
}

/// Send `signal` to every process of group `pgid`; a group that is gone is not an error.
fn kill_group(pgid: i32, signal: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    if unsafe { libc::kill(-pgid, signal) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            tracing::warn!(pgid, signal, error = %e, "cannot signal CMD's process group");
        }
    }
}

/// Send `signal` to group `pgid` and to the groups of its members' descendants that left
/// it ([`escaped_groups`]): what ends CMD. A signal to the group alone missed a nested
/// `baton`'s CMD (`baton lock a -- baton lock b -- CMD`: each CMD has a group of its own),
/// which ran on beside the next holder of `a` (found by review).
fn end_tree(pgid: i32, signal: i32) {
    let escaped = if signal == libc::SIGKILL {
        // The walk reads every /proc/PID/stat (~100 ms with 1,500 processes on a busy
        // machine): freeze the group first, so that it stops at once (a kill by the
        // deadline must not wait for the walk), with its parent links kept for the walk.
        kill_group(pgid, libc::SIGSTOP);
        // The groups apart ran on during the walk, and what they started meanwhile (a
        // `setsid` child) was found by nobody, orphaned by the kill (found by review):
        // freeze them too (see `stop_groups_apart`).
        stop_groups_apart(pgid, |_| false)
    } else {
        escaped_groups(pgid)
    };
    kill_group(pgid, signal);
    for group in escaped {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(-group, signal) };
    }
}

/// How many times at most [`stop_groups_apart`] walks /proc for groups started meanwhile.
const MAX_WALKS: usize = 8;

/// SIGSTOP the groups apart from `pgid` ([`escaped_groups`]), but those `skip` picks, and
/// walk /proc again until no new group is found: a group apart runs on during a walk, and
/// what it starts meanwhile (a `setsid` child) would be found by nobody. A stopped process
/// starts nothing, so this ends; the bound is for groups continued by others. Returns the
/// groups stopped.
fn stop_groups_apart(pgid: i32, skip: impl Fn(i32) -> bool) -> Vec<i32> {
    let mut seen: Vec<i32> = Vec::new();
    let mut stopped = Vec::new();
    for _ in 0..MAX_WALKS {
        let new: Vec<i32> = escaped_groups(pgid)
            .into_iter()
            .filter(|group| !seen.contains(group))
            .collect();
        if new.is_empty() {
            break;
        }
        for &group in &new {
            if !skip(group) {
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe { libc::kill(-group, libc::SIGSTOP) };
                stopped.push(group);
            }
        }
        seen.extend(new);
    }
    stopped
}

/// SIGTERM, then SIGCONT (a stopped group gets it at once), to group `pgid` and to the
/// groups that left it ([`groups_apart_for_term`]).
fn term_tree(pgid: i32) {
    signal_tree(pgid, &[libc::SIGTERM, libc::SIGCONT]);
}

/// Each of `signals`, in turn, to group `pgid` and to the groups that left it
/// ([`groups_apart_for_term`]): not below a nested `baton`, which forwards them.
fn signal_tree(pgid: i32, signals: &[i32]) {
    let apart = groups_apart_for_term(pgid);
    for &signal in signals {
        kill_group(pgid, signal);
        for &group in &apart {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(-group, signal) };
        }
    }
}

/// The process groups, other than `pgid`, of the processes descended from group `pgid`'s
/// members: a nested `baton`'s CMD, a `setsid` child while its parent lives. Never ours,
/// nor groups 0 and 1. (A process that left the group and was orphaned since, its parent
/// gone, is no longer found.)
#[cfg(target_os = "linux")]
fn escaped_groups(pgid: i32) -> Vec<i32> {
    groups_apart(pgid, false)
}

/// [`escaped_groups`], but not below a nested `baton` (a process running our own
/// executable): what it supervises gets our SIGTERM from it, forwarded (sent directly too,
/// a nested CMD got it twice: found by review).
#[cfg(target_os = "linux")]
fn groups_apart_for_term(pgid: i32) -> Vec<i32> {
    groups_apart(pgid, true)
}

#[cfg(not(target_os = "linux"))]
fn groups_apart_for_term(_pgid: i32) -> Vec<i32> {
    Vec::new()
}

#[cfg(target_os = "linux")]
fn groups_apart(pgid: i32, skip_nested: bool) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let own_exe = std::fs::read_link("/proc/self/exe").ok();
    let nested = |pid: i32| {
        skip_nested
            && own_exe.is_some()
            && std::fs::read_link(format!("/proc/{pid}/exe")).ok() == own_exe
    };
    // (pid, parent, group) of every process.
    let procs: Vec<(i32, i32, i32)> = entries
        .flatten()
        .filter_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let (parent, group) = stat_parent_and_group(&stat)?;
            Some((pid, parent, group))
        })
        .collect();
    let mut inside: std::collections::HashSet<i32> =
        procs.iter().filter(|p| p.2 == pgid).map(|p| p.0).collect();
    // The processes whose children are looked at: not a nested `baton`'s, if skipped.
    let mut expand: std::collections::HashSet<i32> =
        inside.iter().copied().filter(|&p| !nested(p)).collect();
    // SAFETY: getpgrp(2) cannot fail and has no preconditions.
    let ours = unsafe { libc::getpgrp() };
    let mut groups = Vec::new();
    loop {
        let mut grew = false;
        for &(pid, parent, group) in &procs {
            if !inside.contains(&pid) && expand.contains(&parent) {
                inside.insert(pid);
                if !nested(pid) {
                    expand.insert(pid);
                }
                grew = true;
                if group != pgid && group > 1 && group != ours && !groups.contains(&group) {
                    groups.push(group);
                }
            }
        }
        if !grew {
            return groups;
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn escaped_groups(_pgid: i32) -> Vec<i32> {
    Vec::new()
}

/// The parent and the process group of a process, from its /proc/PID/stat.
#[cfg(target_os = "linux")]
fn stat_parent_and_group(stat: &str) -> Option<(i32, i32)> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let _state = fields.next()?;
    Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
}

/// True while some process of group `pgid` exists and has not exited.
///
/// Cheap while the group's leader (CMD) runs: kill(2), then one /proc file. Only once the
/// leader has exited are all processes looked at (see [`only_zombies`]).
fn group_alive(pgid: i32) -> bool {
    // SAFETY: kill(2) with signal 0 only checks; no memory-safety preconditions.
    let r = unsafe { libc::kill(-pgid, 0) };
    let exists = r == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH);
    exists && (leader_running(pgid) || !only_zombies(pgid))
}

/// True if process `pgid` exists, leads group `pgid` and has not exited.
#[cfg(target_os = "linux")]
fn leader_running(pgid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pgid}/stat")) else {
        return false;
    };
    matches!(stat_state_and_group(&stat), Some((state, pgrp)) if pgrp == pgid && !exited(state))
}

#[cfg(not(target_os = "linux"))]
fn leader_running(_pgid: i32) -> bool {
    false
}

/// The state letter and process group of a /proc/PID/stat line: "pid (comm) state ppid
/// pgrp …"; comm may contain spaces and parentheses.
#[cfg(target_os = "linux")]
fn stat_state_and_group(stat: &str) -> Option<(&str, i32)> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    let _ppid = fields.next()?;
    Some((state, fields.next()?.parse().ok()?))
}

/// True for the states of a process that has exited: zombie, dead.
#[cfg(target_os = "linux")]
fn exited(state: &str) -> bool {
    state == "Z" || state == "X"
}

/// True if every process of group `pgid` is a zombie (exited, not yet reaped).
///
/// CMD's background jobs are orphaned when CMD exits, and reparented to init. Where init
/// does not reap orphans (a container whose PID 1 is not an init, such as Docker without
/// `--init`), they stay zombies, which kill(2) still finds: without this check `baton`
/// would wait out the whole grace period for processes that have already exited.
#[cfg(target_os = "linux")]
fn only_zombies(pgid: i32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if matches!(stat_state_and_group(&stat), Some((state, pgrp)) if pgrp == pgid && !exited(state))
        {
            return false;
        }
    }
    true
}

#[cfg(not(target_os = "linux"))]
fn only_zombies(_pgid: i32) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guardian_hears_deadlines_then_a_loss() {
        let mut word = Word::default();
        assert_eq!(word.kill_by(), None);
        word.hear(b"D 100\nD 2");
        assert_eq!(word.kill_by(), Some(100));
        word.hear(b"00\n");
        assert_eq!(word.kill_by(), Some(200));
        word.hear(b"L 5000\nD 300\n");
        assert_eq!(
            word.kill_by(),
            Some(5000),
            "a deadline after the loss counts no more"
        );
        word.hear(b"junk\nD x\n");
        assert_eq!(word.kill_by(), Some(5000));
        assert!(!word.job_stopped);
        word.hear(b"S\n");
        assert!(word.job_stopped);
        word.hear(b"R\n");
        assert!(!word.job_stopped);
        word.hear(b"S\nD 7\n");
        assert!(
            !word.job_stopped,
            "any word after a stop means baton runs again"
        );
    }

    #[test]
    fn monotonic_nanoseconds_follow_instants() {
        let now = Instant::now();
        let later = mono_ns(now + Duration::from_secs(3));
        let earlier = mono_ns(now);
        let gap = later - earlier;
        assert!(
            gap > 2_990_000_000 && gap < 3_010_000_000,
            "{gap} ns for 3 s"
        );
        assert!(earlier <= mono_now_ns());
    }

    #[test]
    fn spawn_errors_map_to_126_and_127() {
        let prog = OsString::from("nope");
        let missing = io::Error::from(io::ErrorKind::NotFound);
        assert_eq!(spawn_error(&prog, &missing).code(), exit::NOT_FOUND);
        let denied = io::Error::from(io::ErrorKind::PermissionDenied);
        assert_eq!(spawn_error(&prog, &denied).code(), exit::CANNOT_EXECUTE);
    }

    /// `end_tree` read every /proc/PID/stat before it sent the first signal. The guardian
    /// SIGKILLs CMD's group [`DEADLINE_MARGIN`] (100 ms) before the hold's deadline; on a
    /// machine with ~1,500 processes under load the scan alone took about that long, so CMD
    /// ran on past the deadline, when the next holder may start (found by review). The
    /// group is now stopped first.
    #[cfg(target_os = "linux")]
    #[test]
    fn end_tree_stops_the_group_before_it_scans_proc() {
        use std::os::unix::process::CommandExt;
        let mut others: Vec<std::process::Child> = (0..1500)
            .filter_map(|_| std::process::Command::new("sleep").arg("60").spawn().ok())
            .collect();
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", "while :; do :; done"]).process_group(0);
        let mut cmd = cmd.spawn().unwrap();
        let pgid = i32::try_from(cmd.id()).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        let watcher = std::thread::spawn(move || loop {
            // Running no more: stopped, exited, or gone.
            if !matches!(proc_state(pgid), Some('R' | 'S' | 'D')) {
                return started.elapsed();
            }
            std::thread::sleep(Duration::from_micros(200));
        });
        end_tree(pgid, libc::SIGKILL);
        let scanned = started.elapsed();
        let stopped = watcher.join().unwrap();
        let _ = cmd.wait();
        for other in &mut others {
            let _ = other.kill();
            let _ = other.wait();
        }
        assert!(
            stopped < DEADLINE_MARGIN / 2,
            "CMD ran on for {stopped:?} after end_tree(SIGKILL) was called ({} other processes; end_tree took {scanned:?})",
            others.len()
        );
    }
}
