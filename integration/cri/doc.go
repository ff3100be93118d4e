// Package cri is the test harness for Kubernetes-style pods through containerd's real CRI plugin: a private
// containerd (package integration/containerd, with CRI turned on) whose CNI configuration, pods' network
// namespaces, image store and registry configuration live in temporary directories; crictl and critest of a
// pinned cri-tools release; a pause image built from this harness's own pause program; JSON pod and container
// configurations for `crictl runp`/`create`; a local registry (Debian's docker-registry) holding images built
// here; and snapshots of host state (network namespaces, links, qdiscs, mounts, Kiln state) to prove that a
// pod leaves nothing behind. Runtime handlers are runc (the baseline) and kiln. It knows nothing of Kiln's
// internals.
package cri
