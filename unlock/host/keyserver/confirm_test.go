package keyserver

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/unlockrd/unlockrd/unlock/host/keyserver/store"
	"github.com/unlockrd/unlockrd/unlock/keyproto"
)

func (x *harness) confirm(token, event, key string) *httptest.ResponseRecorder {
	x.clock.Add(time.Minute) // refill the host's bucket: limits are not tested here
	body := `{"event":"` + event + `","key":"` + key + `"}`
	r := httptest.NewRequest("POST", "https://keys.test/v1/keys/db-1/confirm", strings.NewReader(body))
	r.RemoteAddr = "192.0.2.1:1234"
	if token != "" {
		r.Header.Set("Authorization", "Bearer "+token)
	}
	w := httptest.NewRecorder()
	x.h.ServeHTTP(w, r)
	return w
}

func (x *harness) state(t *testing.T) (string, []string) {
	t.Helper()
	x.clock.Add(time.Minute)
	w := x.do("GET", "/v1/keys/db-1", x.token)
	if w.Code != 200 {
		t.Fatalf("key request: %d %s", w.Code, w.Body)
	}
	var r keyproto.Response
	if err := json.Unmarshal(w.Body.Bytes(), &r); err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, k := range r.Keys {
		ids = append(ids, k.ID)
	}
	return r.State, ids
}

// The life of a host: new until it confirms provisioning (and never new
// again), rotating after host rotate, active again once it confirms the
// rotation, with the old key gone.
func TestLifecycleConfirmations(t *testing.T) {
	x := newHarness(t)
	ctx := context.Background()
	st, ids := x.state(t)
	if st != keyproto.StateNew || len(ids) != 1 {
		t.Fatalf("fresh host: state %q keys %v, want new with one key", st, ids)
	}
	first := ids[0]

	// Refusals change nothing.
	for _, c := range []struct {
		token, event, key string
		code              int
	}{
		{"", "provisioned", first, http.StatusUnauthorized},
		{"wrong-token", "provisioned", first, http.StatusUnauthorized},
		{x.token, "provisioned", "1999-01", http.StatusConflict},
		{x.token, "rotated", first, http.StatusConflict},
		{x.token, "formatted", first, http.StatusBadRequest},
	} {
		if w := x.confirm(c.token, c.event, c.key); w.Code != c.code {
			t.Errorf("confirm %s %s (token %q): %d %s, want %d", c.event, c.key, c.token, w.Code, w.Body, c.code)
		}
	}
	if st, _ := x.state(t); st != keyproto.StateNew {
		t.Fatalf("after refused confirmations: state %q", st)
	}

	if w := x.confirm(x.token, "provisioned", first); w.Code != 200 || !strings.Contains(w.Body.String(), `"active"`) {
		t.Fatalf("confirm provisioned: %d %s", w.Code, w.Body)
	}
	if ev := x.lastEvent(); ev.Outcome != OutcomeConfirmed || ev.Event != "provisioned" || ev.Host != "db-1" {
		t.Errorf("audit %+v", ev)
	}
	if st, _ := x.state(t); st != keyproto.StateActive {
		t.Fatalf("after provisioned: state %q, want active", st)
	}
	// A repeat (the host missed the answer) is fine and still active.
	if w := x.confirm(x.token, "provisioned", first); w.Code != 200 || !strings.Contains(w.Body.String(), `"changed":false`) {
		t.Fatalf("repeat: %d %s", w.Code, w.Body)
	}

	next, err := x.admin.Rotate(ctx, "db-1")
	if err != nil {
		t.Fatal(err)
	}
	if st, ids := x.state(t); st != keyproto.StateRotating || len(ids) != 2 || ids[0] != next {
		t.Fatalf("after rotate: %q %v", st, ids)
	}
	if w := x.confirm(x.token, "rotated", first); w.Code != http.StatusConflict {
		t.Fatalf("rotated to the old key: %d %s", w.Code, w.Body)
	}
	if w := x.confirm(x.token, "provisioned", next); w.Code != http.StatusConflict {
		t.Fatalf("provisioned while rotating: %d %s", w.Code, w.Body)
	}
	if w := x.confirm(x.token, "rotated", next); w.Code != 200 {
		t.Fatalf("rotated: %d %s", w.Code, w.Body)
	}
	if st, ids := x.state(t); st != keyproto.StateActive || len(ids) != 1 || ids[0] != next {
		t.Fatalf("after rotated: %q %v", st, ids)
	}

	// Revoked: no confirmation either; reinstated: active, never new.
	if err := x.admin.SetState(ctx, "db-1", store.Revoked); err != nil {
		t.Fatal(err)
	}
	if w := x.confirm(x.token, "rotated", next); w.Code != http.StatusForbidden {
		t.Fatalf("revoked host confirms: %d %s", w.Code, w.Body)
	}
	if err := x.admin.SetState(ctx, "db-1", store.Active); err != nil {
		t.Fatal(err)
	}
	if st, _ := x.state(t); st != keyproto.StateActive {
		t.Fatalf("reinstated: %q", st)
	}
}

func TestConfirmLimits(t *testing.T) {
	x := newHarness(t)
	r := httptest.NewRequest("POST", "https://keys.test/v1/keys/db-1/confirm", strings.NewReader(strings.Repeat(" ", keyproto.MaxConfirmBody+1)))
	r.Header.Set("Authorization", "Bearer "+x.token)
	w := httptest.NewRecorder()
	x.h.ServeHTTP(w, r)
	if w.Code != http.StatusRequestEntityTooLarge {
		t.Fatalf("big body: %d", w.Code)
	}
	if w := x.do("GET", "/v1/keys/db-1/confirm", x.token); w.Code != http.StatusMethodNotAllowed {
		t.Fatalf("GET confirm: %d", w.Code)
	}
	// A body on a key request is still refused.
	r = httptest.NewRequest("GET", "https://keys.test/v1/keys/db-1", strings.NewReader("x"))
	w = httptest.NewRecorder()
	x.h.ServeHTTP(w, r)
	if w.Code != http.StatusRequestEntityTooLarge {
		t.Fatalf("GET with body: %d", w.Code)
	}
}

// An enrolled key (host add --key-file) is in use already: active, so a
// host never formats with it.
func TestEnrolledKeyIsActive(t *testing.T) {
	x := newHarness(t)
	if _, err := x.admin.AddHost(context.Background(), "db-2", []byte("passphrase")); err != nil {
		t.Fatal(err)
	}
	h, err := x.store.Get(context.Background(), "db-2")
	if err != nil || h.Lifecycle() != store.Active {
		t.Fatalf("enrolled: %v %v", h.State, err)
	}
}
