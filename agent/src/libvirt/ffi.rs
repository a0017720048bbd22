//! The few libvirt calls the `virt` crate does not wrap safely, kept in one
//! small module: domain lifecycle event registration, a `GetState` that
//! reports errors (the crate's `Domain::state` turns them into `Unknown`),
//! and the state of every domain in one call (`GetAllDomainStats`).
//!
//! Safety argument: every raw pointer used here comes from a live
//! `Connect`/`Domain` owned by the caller for the duration of the call; the
//! event callback's opaque pointer is a `Box<Sender>` freed exactly once by
//! libvirt through `free_sender`.

use std::collections::BTreeMap;
use std::ffi::{CStr, c_char, c_int, c_uint, c_void};
use std::sync::mpsc::Sender;

use virt::connect::Connect;
use virt::domain::Domain;
use virt::sys;

/// A libvirt domain event, reduced to what the actor needs.
#[derive(Debug, Clone)]
pub struct DomainEvent {
    /// UUID of the domain concerned.
    pub uuid: String,
    /// libvirt's event type (`virDomainEventType`).
    pub event: i32,
}

unsafe extern "C" fn lifecycle_cb(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: c_int,
    _detail: c_int,
    opaque: *mut c_void,
) {
    let mut buf = [0 as c_char; sys::VIR_UUID_STRING_BUFLEN as usize];
    // SAFETY: libvirt passes a domain it keeps referenced for the duration of the callback, and
    // `buf` has the VIR_UUID_STRING_BUFLEN bytes virDomainGetUUIDString writes at most.
    if unsafe { sys::virDomainGetUUIDString(dom, buf.as_mut_ptr()) } < 0 {
        return;
    }
    // SAFETY: on success libvirt wrote a NUL-terminated string into `buf` (within its length),
    // and `buf` lives to the end of this function.
    let uuid = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned();
    // SAFETY: `opaque` is the `Box<Sender<DomainEvent>>` leaked in `register_lifecycle`; libvirt
    // frees it (free_sender) only after the callback is deregistered and no call of it runs, so it
    // is alive here; only a shared reference is made (Sender::send takes &self).
    let tx = unsafe { &*(opaque as *const Sender<DomainEvent>) };
    let _ = tx.send(DomainEvent { uuid, event });
}

unsafe extern "C" fn free_sender(opaque: *mut c_void) {
    // SAFETY: libvirt calls the free callback exactly once, with the `opaque` pointer that
    // `register_lifecycle` made with Box::into_raw and gave to it, after the last callback.
    drop(unsafe { Box::from_raw(opaque as *mut Sender<DomainEvent>) });
}

/// Registers for lifecycle events of every domain on `conn`; each event
/// sends its domain's UUID to `tx`. Returns the callback id.
pub fn register_lifecycle(conn: &Connect, tx: Sender<DomainEvent>) -> Result<i32, virt::error::Error> {
    let opaque = Box::into_raw(Box::new(tx)) as *mut c_void;
    // The generic callback type is how libvirt's C API declares every event
    // callback; the lifecycle one has the extra (event, detail) arguments.
    // SAFETY: this is the cast libvirt's API requires (VIR_DOMAIN_EVENT_CALLBACK): for
    // VIR_DOMAIN_EVENT_ID_LIFECYCLE libvirt calls the pointer with the lifecycle signature, which is
    // exactly `lifecycle_cb`'s; both are `extern "C"` function pointers of the same size.
    let cb: sys::virConnectDomainEventGenericCallback = Some(unsafe {
        std::mem::transmute::<
            unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, c_int, c_int, *mut c_void),
            unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void),
        >(lifecycle_cb)
    });
    // SAFETY: `conn` is borrowed, so its connection pointer is valid for the call; `cb` has the
    // signature libvirt uses for this event id; on success ownership of `opaque` passes to libvirt,
    // which frees it with `free_sender` (the matching Box type).
    let id = unsafe {
        sys::virConnectDomainEventRegisterAny(
            conn.as_ptr(),
            std::ptr::null_mut(),
            sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE as c_int,
            cb,
            opaque,
            Some(free_sender),
        )
    };
    if id < 0 {
        // SAFETY: on failure libvirt did not keep `opaque` (and does not call free_sender), so it is
        // still the unique pointer from Box::into_raw above, freed once here.
        drop(unsafe { Box::from_raw(opaque as *mut Sender<DomainEvent>) });
        return Err(virt::error::Error::last_error());
    }
    Ok(id)
}

/// Deregisters a callback registered with [`register_lifecycle`].
pub fn deregister(conn: &Connect, id: i32) {
    // SAFETY: `conn` is borrowed, so its pointer is valid for the call; libvirt checks the id
    // (a stale one only returns an error) and owns the freeing of the opaque pointer.
    unsafe {
        sys::virConnectDomainEventDeregisterAny(conn.as_ptr(), id);
    }
}

/// `virDomainGetState` with its errors: (state, reason) as libvirt's ints.
pub fn get_state(dom: &Domain) -> Result<(i32, i32), virt::error::Error> {
    let mut state: c_int = -1;
    let mut reason: c_int = -1;
    // SAFETY: `dom` is borrowed, so its pointer is valid for the call; the out-pointers point to
    // local c_ints that outlive it.
    let r = unsafe { sys::virDomainGetState(dom.as_ptr(), &mut state, &mut reason, 0) };
    if r < 0 {
        return Err(virt::error::Error::last_error());
    }
    Ok((state, reason))
}

/// State and reason (libvirt's ints) of every domain on `conn`, by UUID, in
/// one call: `virConnectGetAllDomainStats` with `VIR_DOMAIN_STATS_STATE`
/// (one round trip instead of one `GetState` per domain).
pub fn all_states(conn: &Connect) -> Result<BTreeMap<String, (i32, i32)>, virt::error::Error> {
    let mut recs: *mut sys::virDomainStatsRecordPtr = std::ptr::null_mut();
    // SAFETY: `conn` is borrowed, so its pointer is valid for the call; libvirt allocates the
    // NULL-terminated record list into `recs`, freed once below with virDomainStatsRecordListFree.
    let n =
        unsafe { sys::virConnectGetAllDomainStats(conn.as_ptr(), sys::VIR_DOMAIN_STATS_STATE as c_uint, &mut recs, 0) };
    if n < 0 {
        return Err(virt::error::Error::last_error());
    }
    let mut out = BTreeMap::new();
    for i in 0..n as usize {
        // SAFETY: n >= 0 was returned, so `recs` holds n record pointers followed by a NULL, and
        // i < n stays inside that array.
        let rec = unsafe { *recs.add(i) };
        if rec.is_null() {
            break;
        }
        // SAFETY: `rec` is non-null and points to a record libvirt keeps (with its domain and its
        // parameters) until the list is freed after this loop; only read through a shared reference.
        let r = unsafe { &*rec };
        let mut buf = [0 as c_char; sys::VIR_UUID_STRING_BUFLEN as usize];
        // SAFETY: r.dom is the record's domain, valid until the list is freed; `buf` has the
        // VIR_UUID_STRING_BUFLEN bytes libvirt writes at most.
        if unsafe { sys::virDomainGetUUIDString(r.dom, buf.as_mut_ptr()) } < 0 {
            continue;
        }
        // SAFETY: on success libvirt wrote a NUL-terminated string within `buf`, which outlives this use.
        let uuid = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned();
        let (mut state, mut reason): (c_int, c_int) = (-1, -1);
        // SAFETY: params/nparams describe the record's own parameter array (alive until the list is
        // freed); the names are NUL-terminated C string literals; the out-pointers are local c_ints.
        let found = unsafe {
            sys::virTypedParamsGetInt(r.params, r.nparams, c"state.state".as_ptr(), &mut state) == 1
                && sys::virTypedParamsGetInt(r.params, r.nparams, c"state.reason".as_ptr(), &mut reason) == 1
        };
        if found {
            out.insert(uuid, (state, reason));
        }
    }
    if !recs.is_null() {
        // SAFETY: `recs` is the list libvirt allocated above; nothing borrowed from it is used
        // after this, and it is freed exactly once.
        unsafe { sys::virDomainStatsRecordListFree(recs) };
    }
    Ok(out)
}
