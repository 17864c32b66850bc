//! Child processes that never outlive the test process, and signals to send them.
//!
//! On Linux, children are started from one long-lived thread with
//! `PR_SET_PDEATHSIG = SIGKILL`: the kernel kills them when that thread ends, which is when
//! the test process ends, even if it is itself killed and no `Drop` runs. (The signal is
//! tied to the thread that forked, so forking from a test's own thread would kill the child
//! when that test's thread finishes.)

use std::io;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

type Request = (Command, mpsc::Sender<io::Result<Child>>);

fn spawner() -> &'static Mutex<mpsc::Sender<Request>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        let thread = std::thread::Builder::new()
            .name("baton-testkit-spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    let _ = reply.send(spawn_here(&mut command));
                }
            });
        if let Err(e) = thread {
            panic!("cannot start the process spawner thread: {e}");
        }
        Mutex::new(tx)
    })
}

#[cfg(target_os = "linux")]
fn spawn_here(command: &mut Command) -> io::Result<Child> {
    use std::os::unix::process::CommandExt;
    // SAFETY: getpid and prctl/getppid are async-signal-safe and touch no memory of the
    // parent; this is the documented use of `pre_exec`.
    let parent = unsafe { libc::getpid() };
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                return Err(io::Error::other("the parent process is gone"));
            }
            Ok(())
        });
    }
    command.spawn()
}

#[cfg(not(target_os = "linux"))]
fn spawn_here(command: &mut Command) -> io::Result<Child> {
    command.spawn()
}

/// Start `command` so that it is killed when this process ends.
pub(crate) fn spawn(command: Command) -> io::Result<Child> {
    let (tx, rx) = mpsc::channel();
    {
        let spawner = spawner()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        spawner
            .send((command, tx))
            .map_err(|_| io::Error::other("the process spawner thread is gone"))?;
    }
    rx.recv()
        .map_err(|_| io::Error::other("the process spawner thread is gone"))?
}

/// Send `signal` to process `pid`.
pub(crate) fn signal(pid: u32, signal: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::other("pid out of range"))?;
    // SAFETY: kill(2) has no memory-safety preconditions.
    if unsafe { libc::kill(pid, signal) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Wait (at most `within`) until every thread of process `pid` is stopped (state `T`), as
/// it is some time after SIGSTOP: `kill` returns at once, and a thread that is running
/// stops only when it is next interrupted. A request sent in between may still be answered.
/// True once they all are; false if `within` passed first or the process is gone.
pub(crate) fn wait_stopped(pid: u32, within: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + within;
    loop {
        let all_stopped = std::fs::read_dir(format!("/proc/{pid}/task"))
            .ok()
            .map(|tasks| {
                let mut any = false;
                let all = tasks.flatten().all(|task| {
                    any = true;
                    std::fs::read_to_string(task.path().join("stat"))
                        .ok()
                        .and_then(|stat| {
                            // "tid (comm) state …"; comm may contain spaces and parentheses.
                            let (_, rest) = stat.rsplit_once(')')?;
                            rest.split_whitespace().next()?.chars().next()
                        })
                        .is_some_and(|state| matches!(state, 'T' | 't'))
                });
                any && all
            });
        match all_stopped {
            Some(true) => return true,
            None => return false,
            Some(false) if std::time::Instant::now() >= deadline => return false,
            Some(false) => std::thread::sleep(std::time::Duration::from_millis(2)),
        }
    }
}

/// True if process `pid` holds a socket listening on TCP port `port` of IPv4 loopback (or
/// of any address). A fixture's health check talks to whoever listens on the port: when a
/// port thought free was taken by another process in the meantime, the fixture's own
/// server dies with "address already in use" while the other one answers in its place.
/// This tells the two apart. Where `/proc` cannot be read (not Linux), true.
pub(crate) fn listens_on(pid: u32, port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return true;
    };
    // "sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...",
    // local_address as hex "0100007F:PORT"; st 0A is LISTEN.
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (addr, hex_port) = f.get(1)?.split_once(':')?;
            let ours = u16::from_str_radix(hex_port, 16).ok()? == port
                && (addr == "0100007F" || addr == "00000000")
                && *f.get(3)? == "0A";
            ours.then(|| f.get(9).map(|s| (*s).to_string())).flatten()
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|target| {
            let target = target.to_string_lossy();
            inodes.iter().any(|i| target == format!("socket:[{i}]"))
        })
    })
}
