package adminapi

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"time"
)

// EventKind marks admin audit lines, so they can be told apart from the
// key requests' lines (keyserver.AuditEvent) in one stream.
const EventKind = "admin"

// Outcomes of admin calls (Event.Outcome).
const (
	OutcomeOK         = "ok"
	OutcomeRefused    = "refused"          // TLS handshake refused: no, unknown or expired client certificate
	OutcomeHandshake  = "handshake_failed" // the TLS handshake failed for another reason
	OutcomeBadRequest = "bad_request"
	OutcomeNotFound   = "not_found"
	OutcomeConflict   = "conflict"
	OutcomeForbidden  = "forbidden"
	OutcomeBusy       = "busy"
	OutcomeError      = "error"
)

// Event is one admin call, or one refused connection. It names who (the
// client certificate's subject) did what to which host and how it ended;
// it never holds keys or tokens.
type Event struct {
	Time   time.Time `json:"time"`
	Kind   string    `json:"kind"`
	Remote string    `json:"remote"`
	// Who is the verified client certificate's subject; for a refused
	// handshake, the subject the client presented, if any (unverified).
	Who string `json:"who,omitempty"`
	// Cert is the SHA-256 of that certificate (hex, first 16 bytes): two
	// certificates may share a subject.
	Cert       string   `json:"cert,omitempty"`
	Issuer     string   `json:"issuer,omitempty"` // set on refusals, to see which CA the client came from
	Method     string   `json:"method,omitempty"`
	Path       string   `json:"path,omitempty"` // escaped, truncated; never the query
	Action     string   `json:"action,omitempty"`
	Host       string   `json:"host,omitempty"`
	Status     int      `json:"status"`
	Outcome    string   `json:"outcome"`
	KeyIDs     []string `json:"key_ids,omitempty"`
	Reason     string   `json:"reason,omitempty"` // what was wrong (refusals and 4xx), as answered
	Error      string   `json:"error,omitempty"`  // internal failures only
	DurationMS float64  `json:"duration_ms"`
}

// subject names a certificate for the audit.
func subject(c *x509.Certificate) string {
	if c == nil {
		return ""
	}
	return c.Subject.String()
}

// fingerprint identifies a certificate for the audit.
func fingerprint(c *x509.Certificate) string {
	if c == nil {
		return ""
	}
	sum := sha256.Sum256(c.Raw)
	return hex.EncodeToString(sum[:16])
}
