//! SQLite's WAL writes of the commit thread, gathered into one `pwrite` per commit.
//!
//! SQLite writes a commit's WAL frames one system call at a time, two per page (the 24-byte
//! frame header, then the page), then syncs the file. At 8,000 msg/s those calls were about a
//! seventh of the server's CPU: a commit of five messages from five rooms writes about 19
//! pages, 38 calls, each paying the system call and the file system's per-call work
//! (docs/benchmarks.md, *the WAL writes of a commit in one system call, and `fdatasync`*).
//!
//! This is a VFS shim over SQLite's default VFS. It changes nothing but the WAL file of the
//! connections opened with it (only the commit thread's): writes to consecutive offsets are
//! kept in a buffer and written as one call when anything else touches the file (a sync, a
//! read, a size query, a truncate, a file control, a write elsewhere), or when the buffer
//! reaches [`MAX_PENDING`]. So a commit is one call, or two when it is the first into a WAL
//! that restarted after a checkpoint (SQLite syncs the new header before the frames). Every
//! other file goes to the default VFS untouched.
//!
//! Why this keeps SQLite's guarantees, with `synchronous = FULL` or `EXTRA` (and only then:
//! [`coalesces`] says when the commit thread may use it):
//!
//! - *Durability.* A commit is durable once its frames are synced. SQLite syncs the WAL before
//!   it publishes the commit in the wal-index (`walFrames`: frames, `sqlite3OsSync`, then
//!   `walIndexAppend` and `walIndexWriteHdr`), and the sync writes the buffer first. A crash
//!   before the sync loses frames SQLite never counted on, as it would lose unsynced page
//!   cache; the frames' checksums make recovery stop at the last whole commit.
//! - *Other connections* read frames only up to the published header, so never a buffered
//!   one. Under `NORMAL` a commit is published without a sync, and a reader could then read
//!   bytes still in the buffer: hence FULL or EXTRA only.
//! - *Rollback.* Frames a transaction spilled before rolling back may still be buffered when
//!   the write lock is released; another connection may then write its own frames at the same
//!   offsets. Written later, ours would overwrite them. [`discard_pending`] drops them, and
//!   the commit thread calls it whenever a transaction ends without a commit; closing the file
//!   drops them too (after a commit the buffer is empty).
//! - *Order.* A write that does not continue the buffer writes the buffer first, so the file
//!   sees the same writes in the same order (SQLite rewrites spilled frames in place).

use rusqlite::ffi;
use std::ffi::{CStr, c_int, c_void};
use std::sync::OnceLock;

/// The shim's VFS name (`Connection::open_with_flags_and_vfs`).
pub(super) const VFS_NAME: &CStr = c"stoa-wal-writes";

/// A buffer never grows past this; a commit larger than it takes a call per this many bytes.
/// It is the most the default (unix) VFS writes in one call: `seekAndWriteFd` keeps only the
/// low 17 bits of a length (`nBuf &= 0x1ffff`), as SQLite's own writes are at most a 64 KiB
/// page and its frame header. 31 frames of 4 KiB pages, more than a commit of five messages
/// from five rooms writes (about 19).
const MAX_PENDING: usize = 0x1ffff;

/// Whether a connection with this `synchronous` level may use the shim (see the module doc).
pub(super) fn coalesces(synchronous: &str) -> bool {
    synchronous.eq_ignore_ascii_case("full") || synchronous.eq_ignore_ascii_case("extra")
}

/// The default VFS the shim passes everything to (its address), or why the shim could not be
/// registered: set once, by [`register`].
static ROOT: OnceLock<Result<usize, String>> = OnceLock::new();

/// Register the shim (once per process; later calls return the first outcome).
pub(super) fn register() -> Result<(), String> {
    ROOT.get_or_init(|| {
        // SAFETY: `sqlite3_vfs_find` initialises SQLite and returns its default VFS, which lives
        // as long as the process. The copy keeps its methods and app data (so they work as they
        // do for it) and changes the name, the file size and `xOpen`; it is leaked, as a
        // registered VFS must outlive every connection.
        unsafe {
            let root = ffi::sqlite3_vfs_find(std::ptr::null());
            if root.is_null() {
                return Err("SQLite has no default VFS".to_owned());
            }
            let mut vfs = *root;
            vfs.zName = VFS_NAME.as_ptr();
            vfs.pNext = std::ptr::null_mut();
            vfs.szOsFile = (REAL_OFFSET + (*root).szOsFile as usize) as c_int;
            vfs.xOpen = Some(open);
            let rc = ffi::sqlite3_vfs_register(Box::leak(Box::new(vfs)), 0);
            if rc != ffi::SQLITE_OK {
                return Err(format!("registering SQLite VFS {VFS_NAME:?}: error {rc}"));
            }
            Ok(root as usize)
        }
    })
    .clone()
    .map(|_| ())
}

/// Drop whatever the WAL file of `conn`'s main database holds unwritten. Call it when a
/// transaction ended without a commit (see the module doc); after a commit nothing is held.
pub(super) fn discard_pending(conn: &rusqlite::Connection) {
    if let Some(file) = shim_wal(conn) {
        // SAFETY: the shim's open WAL file of `conn`, which this thread is using.
        unsafe { wal(file).pending.clear() };
    }
}

/// The WAL file of `conn`'s main database if the shim opened it.
fn shim_wal(conn: &rusqlite::Connection) -> Option<*mut ffi::sqlite3_file> {
    let mut file: *mut ffi::sqlite3_file = std::ptr::null_mut();
    // SAFETY: the handle is live for the borrow; `SQLITE_FCNTL_JOURNAL_POINTER` stores the
    // pager's journal file (the WAL file in WAL mode) into `file`, or leaves it null. It is
    // ours only if its methods are the shim's.
    unsafe {
        let rc = ffi::sqlite3_file_control(conn.handle(), c"main".as_ptr(), ffi::SQLITE_FCNTL_JOURNAL_POINTER, (&raw mut file).cast());
        (rc == ffi::SQLITE_OK && !file.is_null() && std::ptr::eq((*file).pMethods, &WAL_METHODS)).then_some(file)
    }
}

/// A WAL file of the shim: SQLite's handle (its methods are [`WAL_METHODS`]), the buffer,
/// and, at [`REAL_OFFSET`] in the same allocation, the default VFS's own handle.
#[repr(C)]
struct WalFile {
    base: ffi::sqlite3_file,
    pending: Vec<u8>,
    /// The file offset of `pending[0]`.
    start: i64,
    /// Write calls made to the file (read by the tests: SQLite's writes gathered into how many).
    calls: u64,
}

/// Where the default VFS's handle sits after a [`WalFile`] (16-byte aligned).
const REAL_OFFSET: usize = std::mem::size_of::<WalFile>().next_multiple_of(16);

static WAL_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 1,
    xClose: Some(close),
    xRead: Some(read),
    xWrite: Some(write),
    xTruncate: Some(truncate),
    xSync: Some(sync),
    xFileSize: Some(file_size),
    xLock: Some(lock),
    xUnlock: Some(unlock),
    xCheckReservedLock: Some(check_reserved_lock),
    xFileControl: Some(file_control),
    xSectorSize: Some(sector_size),
    xDeviceCharacteristics: Some(device_characteristics),
    xShmMap: None,
    xShmLock: None,
    xShmBarrier: None,
    xShmUnmap: None,
    xFetch: None,
    xUnfetch: None,
};

fn root() -> *mut ffi::sqlite3_vfs {
    let root = ROOT.get().and_then(|r| r.as_ref().ok()).expect("the shim is registered before any open");
    *root as *mut ffi::sqlite3_vfs
}

/// # Safety
/// `file` is a handle this shim opened as a WAL file and has not closed.
unsafe fn wal<'a>(file: *mut ffi::sqlite3_file) -> &'a mut WalFile {
    unsafe { &mut *file.cast::<WalFile>() }
}

/// # Safety
/// As [`wal`]: the default VFS's handle inside it.
unsafe fn real(file: *mut ffi::sqlite3_file) -> *mut ffi::sqlite3_file {
    unsafe { file.cast::<u8>().add(REAL_OFFSET).cast() }
}

/// # Safety
/// As [`wal`]: the default VFS's methods of its handle.
unsafe fn real_methods<'a>(file: *mut ffi::sqlite3_file) -> &'a ffi::sqlite3_io_methods {
    unsafe { &*(*real(file)).pMethods }
}

/// Write the buffer, if it holds anything.
///
/// # Safety
/// As [`wal`].
unsafe fn flush(file: *mut ffi::sqlite3_file) -> c_int {
    unsafe {
        let w = wal(file);
        if w.pending.is_empty() {
            return ffi::SQLITE_OK;
        }
        w.calls += 1;
        let rc = (real_methods(file).xWrite.expect("xWrite"))(real(file), w.pending.as_ptr().cast(), w.pending.len() as c_int, w.start);
        w.pending.clear();
        rc
    }
}

unsafe extern "C" fn open(_vfs: *mut ffi::sqlite3_vfs, name: ffi::sqlite3_filename, file: *mut ffi::sqlite3_file, flags: c_int, out_flags: *mut c_int) -> c_int {
    // SAFETY: SQLite hands `file` with `szOsFile` bytes: room for a `WalFile` and the default
    // VFS's handle after it, or (for any other file) for the default VFS's handle alone.
    unsafe {
        let root = root();
        let root_open = (*root).xOpen.expect("xOpen");
        if flags & ffi::SQLITE_OPEN_WAL == 0 {
            return root_open(root, name, file, flags, out_flags);
        }
        (*file).pMethods = std::ptr::null();
        let real = real(file);
        let rc = root_open(root, name, real, flags, out_flags);
        if rc != ffi::SQLITE_OK {
            if !(*real).pMethods.is_null() {
                ((*(*real).pMethods).xClose.expect("xClose"))(real);
            }
            return rc;
        }
        file.cast::<WalFile>().write(WalFile { base: ffi::sqlite3_file { pMethods: &WAL_METHODS }, pending: Vec::new(), start: 0, calls: 0 });
        ffi::SQLITE_OK
    }
}

/// Closing drops the buffer unwritten: after a commit it is empty (the sync wrote it), so
/// anything left is a transaction's that did not commit, and SQLite may have let the write lock
/// go before it closes the file.
unsafe extern "C" fn close(file: *mut ffi::sqlite3_file) -> c_int {
    unsafe {
        let closed = (real_methods(file).xClose.expect("xClose"))(real(file));
        std::ptr::drop_in_place(file.cast::<WalFile>());
        (*file).pMethods = std::ptr::null();
        closed
    }
}

unsafe extern "C" fn write(file: *mut ffi::sqlite3_file, data: *const c_void, amount: c_int, offset: ffi::sqlite3_int64) -> c_int {
    unsafe {
        let bytes = std::slice::from_raw_parts(data.cast::<u8>(), amount.max(0) as usize);
        let w = wal(file);
        let continues = !w.pending.is_empty() && offset == w.start + w.pending.len() as i64;
        if continues && w.pending.len() + bytes.len() <= MAX_PENDING {
            w.pending.extend_from_slice(bytes);
            return ffi::SQLITE_OK;
        }
        let rc = flush(file);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        let w = wal(file);
        if bytes.len() > MAX_PENDING {
            w.calls += 1;
            return (real_methods(file).xWrite.expect("xWrite"))(real(file), data, amount, offset);
        }
        w.start = offset;
        w.pending.extend_from_slice(bytes);
        ffi::SQLITE_OK
    }
}

/// Write the buffer, then call the default VFS's handle with `call` (every method that reads
/// or changes the file as a whole).
///
/// # Safety
/// As [`wal`].
unsafe fn after_flush(file: *mut ffi::sqlite3_file, call: impl FnOnce(&ffi::sqlite3_io_methods, *mut ffi::sqlite3_file) -> c_int) -> c_int {
    unsafe {
        let rc = flush(file);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        call(real_methods(file), real(file))
    }
}

unsafe extern "C" fn read(file: *mut ffi::sqlite3_file, data: *mut c_void, amount: c_int, offset: ffi::sqlite3_int64) -> c_int {
    unsafe { after_flush(file, |m, real| (m.xRead.expect("xRead"))(real, data, amount, offset)) }
}

unsafe extern "C" fn truncate(file: *mut ffi::sqlite3_file, size: ffi::sqlite3_int64) -> c_int {
    unsafe { after_flush(file, |m, real| (m.xTruncate.expect("xTruncate"))(real, size)) }
}

unsafe extern "C" fn sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    unsafe { after_flush(file, |m, real| (m.xSync.expect("xSync"))(real, flags)) }
}

unsafe extern "C" fn file_size(file: *mut ffi::sqlite3_file, size: *mut ffi::sqlite3_int64) -> c_int {
    unsafe { after_flush(file, |m, real| (m.xFileSize.expect("xFileSize"))(real, size)) }
}

unsafe extern "C" fn file_control(file: *mut ffi::sqlite3_file, op: c_int, arg: *mut c_void) -> c_int {
    unsafe { after_flush(file, |m, real| (m.xFileControl.expect("xFileControl"))(real, op, arg)) }
}

unsafe extern "C" fn lock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    unsafe { (real_methods(file).xLock.expect("xLock"))(real(file), level) }
}

unsafe extern "C" fn unlock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    unsafe { (real_methods(file).xUnlock.expect("xUnlock"))(real(file), level) }
}

unsafe extern "C" fn check_reserved_lock(file: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    unsafe { (real_methods(file).xCheckReservedLock.expect("xCheckReservedLock"))(real(file), out) }
}

unsafe extern "C" fn sector_size(file: *mut ffi::sqlite3_file) -> c_int {
    unsafe { (real_methods(file).xSectorSize.expect("xSectorSize"))(real(file)) }
}

unsafe extern "C" fn device_characteristics(file: *mut ffi::sqlite3_file) -> c_int {
    unsafe { (real_methods(file).xDeviceCharacteristics.expect("xDeviceCharacteristics"))(real(file)) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::{Connection, OpenFlags, params};

    /// A database in a temp dir, its path, and a connection through the shim that ran `sql`.
    fn writer(sql: &str) -> (tempfile::TempDir, std::path::PathBuf, Connection) {
        register().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let conn = Connection::open_with_flags_and_vfs(&path, OpenFlags::default(), VFS_NAME).unwrap();
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;").unwrap();
        conn.execute_batch(sql).unwrap();
        (dir, path, conn)
    }

    /// Commits through the shim are whole and visible to a connection of the default VFS
    /// after each commit, and a commit of many pages is one write call.
    #[test]
    fn commits_are_visible_to_other_connections_and_written_in_one_call() {
        let (_dir, path, mut w) = writer("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT); CREATE INDEX t_v ON t (v);");
        let reader = Connection::open(&path).unwrap();
        let mut two_calls = 0;
        for round in 0..50i64 {
            let calls = write_calls(&w);
            let txn = w.transaction().unwrap();
            for i in 0..40 {
                txn.execute("INSERT INTO t (k, v) VALUES (?1, ?2)", params![round * 1000 + i, format!("{:0>600}", round * 7919 + i)]).unwrap();
            }
            txn.commit().unwrap();
            let count: i64 = reader.query_row("SELECT count(*) FROM t", [], |r| r.get(0)).unwrap();
            assert_eq!(count, (round + 1) * 40);
            // About a dozen pages, two writes each for SQLite: one call; two for the first
            // commit into a WAL restarted after a checkpoint, whose header SQLite syncs first.
            match write_calls(&w) - calls {
                1 => {}
                2 => two_calls += 1,
                n => panic!("round {round}: the commit's writes took {n} calls"),
            }
        }
        assert!(two_calls <= 2, "{two_calls} of 50 commits took two calls");
        // One commit larger than a buffer (several calls, each within the VFS's limit).
        let txn = w.transaction().unwrap();
        for i in 0..2_000i64 {
            txn.execute("INSERT INTO t (k, v) VALUES (?1, ?2)", params![1_000_000 + i, format!("{i:0>600}")]).unwrap();
        }
        txn.commit().unwrap();
        let count: i64 = reader.query_row("SELECT count(*) FROM t", [], |r| r.get(0)).unwrap();
        assert_eq!(count, 50 * 40 + 2_000);
        let ok: String = reader.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
        assert_eq!(ok, "ok");
    }

    /// A transaction bigger than the cache spills frames through the buffer, rolls back, and
    /// another connection then commits at the same offsets: the database stays whole, with
    /// the other commit's rows and none of the rolled-back ones.
    #[test]
    fn a_spilled_and_rolled_back_transaction_leaves_the_wal_whole() {
        let (_dir, path, w) = writer("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT); PRAGMA cache_size = 10;");
        let other = Connection::open(&path).unwrap();
        other.busy_timeout(std::time::Duration::from_secs(5)).unwrap();

        w.execute_batch("BEGIN IMMEDIATE").unwrap();
        for i in 0..200i64 {
            w.execute("INSERT INTO t (k, v) VALUES (?1, ?2)", params![i, format!("{i:x>600}")]).unwrap();
        }
        assert!(pending_len(&w) > 0, "the test needs frames spilled into the buffer");
        w.execute_batch("ROLLBACK").unwrap();
        discard_pending(&w);

        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        for i in 0..200i64 {
            other.execute("INSERT INTO t (k, v) VALUES (?1, ?2)", params![i, format!("{i:o>600}")]).unwrap();
        }
        other.execute_batch("COMMIT").unwrap();
        w.execute("INSERT INTO t (k, v) VALUES (?1, ?2)", params![1_000, "after"]).unwrap();

        let fresh = Connection::open(&path).unwrap();
        let ok: String = fresh.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
        assert_eq!(ok, "ok");
        let v: String = fresh.query_row("SELECT v FROM t WHERE k = 7", [], |r| r.get(0)).unwrap();
        assert_eq!(v, format!("{:o>600}", 7));
        let n: i64 = fresh.query_row("SELECT count(*) FROM t", [], |r| r.get(0)).unwrap();
        assert_eq!(n, 201);
    }

    /// `discard_pending` drops what the buffer holds: it never reaches the file, even when
    /// the next write or sync would have written it.
    #[test]
    fn discarded_writes_never_reach_the_file() {
        let (dir, _path, w) = writer("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT); INSERT INTO t VALUES (1, 'one');");
        let wal_path = dir.path().join("t.db-wal");
        let size = std::fs::metadata(&wal_path).unwrap().len();
        let far = size as i64 + (1 << 20);
        // SAFETY: the shim's own WAL file of `w`, between transactions.
        let rc = unsafe { write(wal_file(&w), b"junk".as_ptr().cast(), 4, far) };
        assert_eq!(rc, ffi::SQLITE_OK);
        assert_eq!(pending_len(&w), 4);
        discard_pending(&w);
        assert_eq!(pending_len(&w), 0);
        w.execute("INSERT INTO t (k, v) VALUES (2, 'two')", []).unwrap();
        assert!(std::fs::metadata(&wal_path).unwrap().len() < far as u64, "the discarded bytes were written");
        let n: i64 = w.query_row("SELECT count(*) FROM t", [], |r| r.get(0)).unwrap();
        assert_eq!(n, 2);
    }

    fn wal_file(conn: &Connection) -> *mut ffi::sqlite3_file {
        shim_wal(conn).expect("the WAL file is the shim's")
    }

    /// What the WAL file of `conn` holds unwritten.
    fn pending_len(conn: &Connection) -> usize {
        // SAFETY: the shim's own WAL file of `conn`, on this thread.
        unsafe { wal(wal_file(conn)).pending.len() }
    }

    /// Write calls the shim made to the WAL file of `conn`.
    fn write_calls(conn: &Connection) -> u64 {
        // SAFETY: as above.
        unsafe { wal(wal_file(conn)).calls }
    }
}
