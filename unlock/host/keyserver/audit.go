package keyserver

import (
	"encoding/json"
	"io"
	"sync"
	"time"
)

// Outcomes recorded in AuditEvent.Outcome.
const (
	OutcomeOK               = "ok"
	OutcomeNoToken          = "no_token"
	OutcomeBadToken         = "bad_token"
	OutcomeRevoked          = "revoked"
	OutcomeUnknownHost      = "unknown_host"
	OutcomeBadHost          = "bad_host"
	OutcomeRateLimited      = "rate_limited"
	OutcomeMethodNotAllowed = "method_not_allowed"
	OutcomeNotFound         = "not_found"
	OutcomeBadRequest       = "bad_request"
	OutcomeBusy             = "busy"
	OutcomeError            = "error"
	OutcomeHealth           = "health"
	OutcomeConfirmed        = "confirmed" // a host's confirmation recorded
	OutcomeConflict         = "conflict"  // a confirmation that does not fit the record
)

// AuditEvent describes one request. It never holds key material or
// tokens: only who asked for what and how it was answered.
type AuditEvent struct {
	Time       time.Time `json:"time"`
	Remote     string    `json:"remote"`
	Method     string    `json:"method"`
	Path       string    `json:"path"` // escaped path, truncated; never the query
	Host       string    `json:"host,omitempty"`
	Status     int       `json:"status"`
	Outcome    string    `json:"outcome"`
	KeyIDs     []string  `json:"key_ids,omitempty"`
	Event      string    `json:"event,omitempty"` // a confirmation's event (keyproto.EventProvisioned, EventRotated)
	DurationMS float64   `json:"duration_ms"`
	Reason     string    `json:"reason,omitempty"` // what was wrong with the request (4xx), as answered
	Error      string    `json:"error,omitempty"`  // internal failures only
}

// JSONAudit returns an audit sink writing one JSON object per line to w.
// Lines are written whole, one at a time, so concurrent requests can't
// interleave them.
func JSONAudit(w io.Writer) func(AuditEvent) { return JSONLines[AuditEvent](w) }

// JSONLines returns a sink writing each value as one JSON line to w, whole
// and one at a time (JSONAudit's writer, for other audit event types).
func JSONLines[T any](w io.Writer) func(T) {
	var mu sync.Mutex
	return func(ev T) {
		b, err := json.Marshal(ev)
		if err != nil {
			return
		}
		b = append(b, '\n')
		mu.Lock()
		defer mu.Unlock()
		w.Write(b)
	}
}

// Audits returns one audit sink calling each non-nil sink in turn (the
// log, the metrics, the last-seen recorder).
func Audits(sinks ...func(AuditEvent)) func(AuditEvent) {
	var on []func(AuditEvent)
	for _, s := range sinks {
		if s != nil {
			on = append(on, s)
		}
	}
	return func(ev AuditEvent) {
		for _, s := range on {
			s(ev)
		}
	}
}
