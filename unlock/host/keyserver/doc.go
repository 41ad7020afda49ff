// Package keyserver is the reference key service (DESIGN §5): an HTTP
// handler that hands each host its LUKS keys to a bearer of the host's
// token, the admin operations behind the unlockrd-keyserver command, and
// helpers (certificates, data folder, hardened http.Server, a pinned
// client) that let tests run the same service in-process.
//
// # Data folder
//
//	DIR/            0700
//	  master.key    0600  32-byte AES-256 master key, hex (absent with --master-key)
//	  hosts.db      0600  bbolt: host records, keys sealed under the master key
//	  tls.key       0600  ECDSA P-256 key; its SPKI hash is the pin
//	  tls.crt       0644  self-signed, remade (same key, same pin) when names change
//
// hosts.db records which master key (by a MAC-derived id, see Sealer.ID)
// sealed its keys, so a server given the wrong master key refuses to start
// instead of failing each host at boot time.
//
// # Replicas on etcd
//
// With DataOptions.Etcd (`--store etcd`) the host records live in etcd
// (store/etcdstore) and hosts.db is not used: any number of stateless
// replicas serve the same hosts, and an admin command run with any
// replica's settings is seen by all at their next request (reads are
// linearizable). The folder keeps what must never be in etcd: master.key,
// which every replica needs (the first process on an empty prefix creates
// it; the others are given a copy, or a shared path with --master-key,
// and refuse to start without it rather than make their own), and the TLS
// key (copied too, so one pin covers every replica; or one key each, all
// pins in the image). The master key's id is recorded in etcd, so a
// replica with the wrong key refuses to start, as with hosts.db.
//
// # Keys at rest
//
// Each host key is sealed with AES-256-GCM under the master key, with the
// host id and key id as associated data: a sealed key copied into another
// host's record, or reordered within one, does not open. Tokens are stored
// as SHA-256 hashes and compared in constant time.
//
// # Admin commands next to a running server
//
// bbolt lets one process hold a file read-write (exclusive flock) or many
// read-only (shared flock). The store opens hosts.db per operation and
// closes it straight after: each key request takes the shared lock for well
// under a millisecond, each admin change the exclusive lock for one fsync'd
// transaction. Either side waits up to a lock timeout for the other (5 s for
// the server, answering 503 + Retry-After if it runs out; 10 s for admin
// commands, --lock-timeout). No IPC: a change is visible to the next
// request. Key requests mostly don't open the file at all: the server
// keeps a snapshot of the records and, at each request, checks with one
// stat and one pread of bbolt's meta pages that no transaction was
// committed since (boltstore/snapshot.go); only after a change does one
// request read the file again.
//
// # Request handling
//
// GET /v1/keys/{host} is checked in this order, cheapest and least
// revealing first: the source's admission (429 + Retry-After, see below),
// a request body (413), method (405), host id syntax (400), bearer token
// present (401), host known (404), token matches (401), host active (403),
// and only then the host's and the global token bucket (429 +
// Retry-After). Then the keys are unsealed, written as {"keys":[...]}
// (current first) and wiped. A 4xx body says what was wrong. Every
// request, including /healthz and those net/http rejects itself
// (malformed, headers over MaxHeaderBytes, cut short; seen through the
// server's ConnState hook), yields one AuditEvent (JSON line on stderr in
// the command) with no key material or token.
//
// # Admission
//
// Host ids are not secret, so nothing a client without the token does may
// spend what a host needs. The host's bucket and the global bucket are
// charged only once the token matched. A failed key request (any 4xx
// above) is charged to its source, an IPv4 address or an IPv6 /64
// (SourceOf), and to a global failure budget; a source whose failure
// bucket is empty, or which failed recently while the failure budget is
// spent, is refused before any store work. A source that has not failed
// is never refused there, so hosts keep booting while others flood.
//
// Below HTTP, SourceListener caps each source's open connections and new
// connections per second, refusing the excess right after accept, before
// a handshake is paid; the server speaks HTTP/1.1 only (no h2, whose
// streams would multiply the handlers one connection holds), one request
// per connection (no idle keep-alive holding a slot), with 5 s to finish
// the handshake and the headers. The abuse suite (qemu-tests/abuse) runs
// the attacks against the binary.
//
// # Load
//
// Admission control sheds work the handler would do, but a TLS handshake
// is paid before any handler runs, and dominates the cost of a fetch. So
// the listener also caps the connections served at once (DefaultMaxConns):
// beyond it connections wait in the kernel's listen queue, and the
// server's memory stays bounded whatever the size of the fleet booting.
package keyserver
