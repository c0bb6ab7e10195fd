//! Runs after the other end-to-end binaries (cargo runs test targets in name order): no lab
//! namespace or link of a finished process may remain. Labs of processes still running (say a
//! demo in another shell) are not leftovers and are ignored.

#[test]
fn no_lab_namespace_or_link_remains() {
    let stale = netrace_lab::stale_leftovers();
    assert!(
        stale.is_empty(),
        "lab namespaces/links of finished processes remain: {stale:?} \
         (remove them with `ip netns del NAME`)"
    );
    let mine = netrace_lab::leftovers();
    assert!(mine.is_empty(), "this process's lab names remain: {mine:?}");
}
