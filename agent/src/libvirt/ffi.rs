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
    // SAFETY: libvirt passes a valid domain for the duration of the callback.
    if unsafe { sys::virDomainGetUUIDString(dom, buf.as_mut_ptr()) } < 0 {
        return;
    }
    // SAFETY: the buffer was NUL-terminated by libvirt.
    let uuid = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned();
    // SAFETY: opaque is the Box<Sender> registered below, alive until free_sender.
    let tx = unsafe { &*(opaque as *const Sender<DomainEvent>) };
    let _ = tx.send(DomainEvent { uuid, event });
}

unsafe extern "C" fn free_sender(opaque: *mut c_void) {
    // SAFETY: called once by libvirt with the pointer we leaked in register.
    drop(unsafe { Box::from_raw(opaque as *mut Sender<DomainEvent>) });
}

/// Registers for lifecycle events of every domain on `conn`; each event
/// sends its domain's UUID to `tx`. Returns the callback id.
pub fn register_lifecycle(conn: &Connect, tx: Sender<DomainEvent>) -> Result<i32, virt::error::Error> {
    let opaque = Box::into_raw(Box::new(tx)) as *mut c_void;
    // The generic callback type is how libvirt's C API declares every event
    // callback; the lifecycle one has the extra (event, detail) arguments.
    let cb: sys::virConnectDomainEventGenericCallback = Some(unsafe {
        std::mem::transmute::<
            unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, c_int, c_int, *mut c_void),
            unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void),
        >(lifecycle_cb)
    });
    // SAFETY: conn is alive; opaque ownership passes to libvirt.
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
        // SAFETY: libvirt did not take ownership on failure.
        drop(unsafe { Box::from_raw(opaque as *mut Sender<DomainEvent>) });
        return Err(virt::error::Error::last_error());
    }
    Ok(id)
}

/// Deregisters a callback registered with [`register_lifecycle`].
pub fn deregister(conn: &Connect, id: i32) {
    // SAFETY: conn is alive; a stale id only makes libvirt return an error.
    unsafe {
        sys::virConnectDomainEventDeregisterAny(conn.as_ptr(), id);
    }
}

/// `virDomainGetState` with its errors: (state, reason) as libvirt's ints.
pub fn get_state(dom: &Domain) -> Result<(i32, i32), virt::error::Error> {
    let mut state: c_int = -1;
    let mut reason: c_int = -1;
    // SAFETY: dom is alive; out-pointers are valid.
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
    // SAFETY: conn is alive; libvirt allocates the NULL-terminated record
    // list, freed below with virDomainStatsRecordListFree.
    let n =
        unsafe { sys::virConnectGetAllDomainStats(conn.as_ptr(), sys::VIR_DOMAIN_STATS_STATE as c_uint, &mut recs, 0) };
    if n < 0 {
        return Err(virt::error::Error::last_error());
    }
    let mut out = BTreeMap::new();
    for i in 0..n as usize {
        // SAFETY: recs holds n valid record pointers (then a NULL).
        let rec = unsafe { *recs.add(i) };
        if rec.is_null() {
            break;
        }
        // SAFETY: a record, its domain and its parameters live until the list is freed.
        let r = unsafe { &*rec };
        let mut buf = [0 as c_char; sys::VIR_UUID_STRING_BUFLEN as usize];
        // SAFETY: r.dom is a valid domain; buf has the size libvirt needs.
        if unsafe { sys::virDomainGetUUIDString(r.dom, buf.as_mut_ptr()) } < 0 {
            continue;
        }
        // SAFETY: NUL-terminated by libvirt.
        let uuid = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned();
        let (mut state, mut reason): (c_int, c_int) = (-1, -1);
        // SAFETY: params/nparams come from the record; names are NUL-terminated; out-pointers valid.
        let found = unsafe {
            sys::virTypedParamsGetInt(r.params, r.nparams, c"state.state".as_ptr(), &mut state) == 1
                && sys::virTypedParamsGetInt(r.params, r.nparams, c"state.reason".as_ptr(), &mut reason) == 1
        };
        if found {
            out.insert(uuid, (state, reason));
        }
    }
    if !recs.is_null() {
        // SAFETY: the list libvirt returned above, freed once.
        unsafe { sys::virDomainStatsRecordListFree(recs) };
    }
    Ok(out)
}
