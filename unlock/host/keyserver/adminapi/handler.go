package adminapi

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/unlockrd/unlockrd/unlock/host/keyserver"
	"github.com/unlockrd/unlockrd/unlock/host/keyserver/store"
)

// HostsPath is the collection of hosts; one host is HostsPath/{host}, and
// its actions HostsPath/{host}/{action}.
const HostsPath = "/v1/hosts"

// Actions on one host (POST HostsPath/{host}/{action}).
const (
	ActionRotate    = "rotate"
	ActionFinish    = "finish"
	ActionRevoke    = "revoke"
	ActionReinstate = "reinstate"
	ActionToken     = "token"
	ActionExport    = "export"
)

// MaxBody bounds a request body: the largest is an add with an imported
// key (keyserver.MaxKeySize, base64) and a host id.
const MaxBody = 64 << 10

// opTimeout bounds one operation's store work.
const opTimeout = 15 * time.Second

// Handler serves the admin API. Only connections whose client certificate
// verified reach it (see TLSConfig); it audits every call.
type Handler struct {
	// Ops does the work: Local over the server's store and sealer.
	Ops Ops
	// AllowExport enables the export action (serve --admin-allow-export).
	AllowExport bool
	// Audit receives one Event per call; nil audits nothing.
	Audit func(Event)
	// Now is the clock; nil means time.Now.
	Now func() time.Time

	conns *conns
}

// AddRequest is the body of POST HostsPath.
type AddRequest struct {
	Host string `json:"host"`
	// Key, if set, is an existing passphrase to enrol (base64 in JSON)
	// instead of a new random one.
	Key []byte `json:"key,omitempty"`
}

// ErrorBody is the JSON body of every error answer.
type ErrorBody struct {
	Error string `json:"error"`
	Field string `json:"field,omitempty"` // the request field at fault, if one is
	Host  string `json:"host,omitempty"`
}

// ExportedKey is one key in an export answer.
type ExportedKey struct {
	ID  string `json:"id"`
	Key []byte `json:"key"` // base64 in JSON
}

// Export is the answer to the export action.
type Export struct {
	Host string        `json:"host"`
	Keys []ExportedKey `json:"keys"`
}

func (h *Handler) now() time.Time {
	if h.Now != nil {
		return h.Now()
	}
	return time.Now()
}

// apiError is an answer other than 2xx.
type apiError struct {
	status  int
	outcome string
	body    ErrorBody
	err     error // internal cause (5xx), for the audit only
}

func badField(field, host, msg string) *apiError {
	return &apiError{status: http.StatusBadRequest, outcome: OutcomeBadRequest,
		body: ErrorBody{Error: msg, Field: field, Host: host}}
}

// fromErr maps an operation's error to an answer. Messages of the admin
// operations name the host and say what is wrong; they never hold secrets.
func fromErr(host string, err error) *apiError {
	e := &apiError{body: ErrorBody{Error: err.Error(), Host: host}}
	switch {
	case errors.Is(err, store.ErrNotFound):
		e.status, e.outcome = http.StatusNotFound, OutcomeNotFound
	case errors.Is(err, store.ErrExists), errors.Is(err, keyserver.ErrRotating):
		e.status, e.outcome = http.StatusConflict, OutcomeConflict
	case errors.Is(err, store.ErrBusy), errors.Is(err, context.DeadlineExceeded):
		e.status, e.outcome = http.StatusServiceUnavailable, OutcomeBusy
	default:
		e.status, e.outcome, e.err = http.StatusInternalServerError, OutcomeError, err
		e.body.Error = fmt.Sprintf("host %q: internal error (see the server's log)", host)
		if host == "" {
			e.body.Error = "internal error (see the server's log)"
		}
	}
	return e
}

const maxAuditPath = 160

// ServeHTTP implements http.Handler.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := h.now()
	h.conns.served(r)
	ev := Event{Time: start.UTC(), Kind: EventKind, Remote: r.RemoteAddr, Method: r.Method, Path: r.URL.EscapedPath()}
	if len(ev.Path) > maxAuditPath {
		ev.Path = ev.Path[:maxAuditPath] + "..."
	}
	if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
		ev.Who, ev.Cert = subject(r.TLS.PeerCertificates[0]), fingerprint(r.TLS.PeerCertificates[0])
	}
	hdr := w.Header()
	hdr.Set("Cache-Control", "no-store")
	hdr.Set("X-Content-Type-Options", "nosniff")

	status, out, aerr := h.route(w, r, &ev)
	if aerr != nil {
		status, ev.Outcome = aerr.status, aerr.outcome
		if aerr.status < 500 {
			ev.Reason = truncate(aerr.body.Error)
		} else if aerr.err != nil {
			ev.Error = aerr.err.Error()
		}
		if aerr.status == http.StatusServiceUnavailable {
			hdr.Set("Retry-After", "1")
		}
		writeJSON(w, status, aerr.body)
	} else {
		ev.Outcome = OutcomeOK
		writeJSON(w, status, out)
		if ex, ok := out.(*Export); ok {
			for _, k := range ex.Keys {
				clear(k.Key)
			}
		}
	}
	ev.Status = status
	if h.Audit != nil {
		ev.DurationMS = float64(h.now().Sub(start).Microseconds()) / 1000
		h.Audit(ev)
	}
}

// maxReason bounds a reason in the audit: it may quote the request (an
// unknown field's name).
const maxReason = 256

func truncate(s string) string {
	if len(s) > maxReason {
		return s[:maxReason] + "..."
	}
	return s
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		status = http.StatusInternalServerError
		b = []byte(`{"error":"internal error: encoding the answer"}`)
	}
	defer clear(b) // an export's keys are in it
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	w.Write(b) // not append(b, '\n'): a grown copy would escape the clear
	w.Write([]byte{'\n'})
}

// route runs the call r asks for and returns the status and answer, or
// the error answer.
func (h *Handler) route(w http.ResponseWriter, r *http.Request, ev *Event) (int, any, *apiError) {
	rest, ok := strings.CutPrefix(r.URL.EscapedPath(), HostsPath)
	if !ok || (rest != "" && rest[0] != '/') {
		return 0, nil, &apiError{status: http.StatusNotFound, outcome: OutcomeNotFound,
			body: ErrorBody{Error: "not found: the admin API is under " + HostsPath}}
	}
	segs := strings.Split(strings.TrimPrefix(rest, "/"), "/")
	if rest == "" || rest == "/" {
		segs = nil
	}
	if len(segs) > 2 {
		return 0, nil, &apiError{status: http.StatusNotFound, outcome: OutcomeNotFound,
			body: ErrorBody{Error: "not found: want " + HostsPath + "[/{host}[/{action}]]"}}
	}
	ctx, cancel := context.WithTimeout(r.Context(), opTimeout)
	defer cancel()

	if len(segs) == 0 {
		switch r.Method {
		case http.MethodGet:
			ev.Action = "list"
			if err := noBody(w, r); err != nil {
				return 0, nil, err
			}
			hosts, err := h.Ops.List(ctx)
			if err != nil {
				return 0, nil, fromErr("", err)
			}
			return http.StatusOK, map[string][]HostInfo{"hosts": hosts}, nil
		case http.MethodPost:
			ev.Action = "add"
			return h.add(ctx, w, r, ev)
		}
		return 0, nil, notAllowed(w, "GET, POST")
	}

	id, err := url.PathUnescape(segs[0])
	if err == nil {
		err = keyserver.ValidHostID(id)
	}
	if err != nil {
		return 0, nil, badField("host", "", "host in the path: "+err.Error())
	}
	ev.Host = id
	if len(segs) == 1 {
		ev.Action = "get"
		if r.Method != http.MethodGet {
			return 0, nil, notAllowed(w, "GET")
		}
		if err := noBody(w, r); err != nil {
			return 0, nil, err
		}
		hi, err := h.Ops.Get(ctx, id)
		if err != nil {
			return 0, nil, fromErr(id, err)
		}
		return http.StatusOK, hi, nil
	}

	action := segs[1]
	switch action {
	case ActionRotate, ActionFinish, ActionRevoke, ActionReinstate, ActionToken, ActionExport:
	default:
		return 0, nil, &apiError{status: http.StatusNotFound, outcome: OutcomeNotFound, body: ErrorBody{Host: id,
			Error: fmt.Sprintf("host %q: unknown action %q (want rotate, finish, revoke, reinstate, token or export)", id, action)}}
	}
	ev.Action = action
	if r.Method != http.MethodPost {
		return 0, nil, notAllowed(w, "POST")
	}
	if err := noBody(w, r); err != nil {
		return 0, nil, err
	}
	switch action {
	case ActionRotate:
		kid, err := h.Ops.Rotate(ctx, id)
		if err != nil {
			return 0, nil, fromErr(id, err)
		}
		ev.KeyIDs = []string{kid}
		return http.StatusOK, map[string]string{"host": id, "key_id": kid}, nil
	case ActionFinish:
		dropped, err := h.Ops.Finish(ctx, id)
		if err != nil {
			return 0, nil, fromErr(id, err)
		}
		ev.KeyIDs = dropped
		if dropped == nil {
			dropped = []string{}
		}
		return http.StatusOK, map[string]any{"host": id, "dropped": dropped}, nil
	case ActionRevoke, ActionReinstate:
		st := store.Revoked
		if action == ActionReinstate {
			st = store.Active
		}
		hi, err := h.Ops.SetState(ctx, id, st)
		if err != nil {
			return 0, nil, fromErr(id, err)
		}
		return http.StatusOK, hi, nil
	case ActionToken:
		token, err := h.Ops.NewToken(ctx, id)
		if err != nil {
			return 0, nil, fromErr(id, err)
		}
		return http.StatusOK, map[string]string{"host": id, "token": token}, nil
	default: // ActionExport
		if !h.AllowExport {
			return 0, nil, &apiError{status: http.StatusForbidden, outcome: OutcomeForbidden, body: ErrorBody{Host: id,
				Error: fmt.Sprintf("host %q: key export is disabled on this server (serve --admin-allow-export enables it)", id)}}
		}
		ids, keys, err := h.Ops.Export(ctx, id)
		if err != nil {
			return 0, nil, fromErr(id, err)
		}
		ev.KeyIDs = ids
		ex := &Export{Host: id, Keys: make([]ExportedKey, len(ids))}
		for i := range ids {
			ex.Keys[i] = ExportedKey{ID: ids[i], Key: keys[i]}
		}
		return http.StatusOK, ex, nil
	}
}

func notAllowed(w http.ResponseWriter, allow string) *apiError {
	w.Header().Set("Allow", allow)
	return &apiError{status: http.StatusMethodNotAllowed, outcome: OutcomeBadRequest,
		body: ErrorBody{Error: "method not allowed: use " + allow}}
}

// noBody accepts an empty body or an empty JSON object: actions take no
// arguments, and a body with fields would be a client expecting something
// we don't do.
func noBody(w http.ResponseWriter, r *http.Request) *apiError {
	b, err := io.ReadAll(http.MaxBytesReader(w, r.Body, MaxBody))
	if err != nil {
		return bodyErr(err)
	}
	if len(bytes.TrimSpace(b)) == 0 {
		return nil
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(b, &m); err != nil || len(m) != 0 {
		return badField("", "", "this call takes no request body (or {})")
	}
	return nil
}

func bodyErr(err error) *apiError {
	var mbe *http.MaxBytesError
	if errors.As(err, &mbe) {
		return &apiError{status: http.StatusRequestEntityTooLarge, outcome: OutcomeBadRequest,
			body: ErrorBody{Error: fmt.Sprintf("request body over %d bytes", MaxBody)}}
	}
	return badField("", "", "reading the request body: "+err.Error())
}

func (h *Handler) add(ctx context.Context, w http.ResponseWriter, r *http.Request, ev *Event) (int, any, *apiError) {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, MaxBody))
	defer clear(body) // may hold a key
	if err != nil {
		return 0, nil, bodyErr(err)
	}
	var req AddRequest
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	err = dec.Decode(&req)
	defer clear(req.Key)
	if err != nil {
		return 0, nil, badField(jsonField(err), "", "request body: "+jsonMessage(err))
	}
	if dec.More() {
		return 0, nil, badField("", "", "request body: more than one JSON value")
	}
	if err := keyserver.ValidHostID(req.Host); err != nil {
		return 0, nil, badField("host", "", "host: "+err.Error())
	}
	ev.Host = req.Host
	var key []byte
	if req.Key != nil {
		if len(req.Key) == 0 || len(req.Key) > keyserver.MaxKeySize {
			return 0, nil, badField("key", req.Host, fmt.Sprintf("host %q: key is %d bytes, want 1 to %d", req.Host, len(req.Key), keyserver.MaxKeySize))
		}
		key = req.Key
	}
	a, err := h.Ops.Add(ctx, req.Host, key)
	if err != nil {
		return 0, nil, fromErr(req.Host, err)
	}
	if a.KeyID != "" {
		ev.KeyIDs = []string{a.KeyID}
	}
	return http.StatusCreated, a, nil
}

// jsonField names the field a decoding error is about, if it says.
func jsonField(err error) string {
	var te *json.UnmarshalTypeError
	var be base64.CorruptInputError
	if errors.As(err, &be) {
		return "key" // the only []byte field
	}
	if errors.As(err, &te) {
		return te.Field
	}
	if f, ok := strings.CutPrefix(err.Error(), "json: unknown field "); ok {
		return strings.Trim(f, `"`)
	}
	return ""
}

// jsonMessage is a decoding error without the input: a field that failed
// to decode may have held a key.
func jsonMessage(err error) string {
	var te *json.UnmarshalTypeError
	var se *json.SyntaxError
	switch {
	case errors.As(err, &te):
		return fmt.Sprintf("field %q: want a JSON %s", te.Field, te.Type)
	case errors.As(err, &se):
		return fmt.Sprintf("not JSON (at byte %d)", se.Offset)
	case errors.Is(err, io.EOF):
		return "empty; want {\"host\": NAME}"
	}
	var be base64.CorruptInputError
	if errors.As(err, &be) {
		return `field "key": want standard base64`
	}
	return err.Error()
}
