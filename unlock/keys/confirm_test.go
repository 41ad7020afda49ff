package keys

import (
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/unlockrd/unlockrd/unlock/keyproto"
	"github.com/unlockrd/unlockrd/unlock/pin"
)

// The confirmation goes to the server that answered, to its key URL +
// /confirm, as a POST with the same token and a JSON body naming the key
// id only; the state the server sent is kept.
func TestConfirmPostsToTheAnsweringServer(t *testing.T) {
	leaf := makeCert(t, validTemplate("leaf", false), nil, nil)
	var got keyproto.Confirmation
	var gotPath, gotMethod string
	status := 200
	s := startServer(t, []*certKit{leaf}, func(w http.ResponseWriter, r *http.Request) {
		if strings.HasSuffix(r.URL.Path, keyproto.ConfirmSuffix) {
			gotPath, gotMethod = r.URL.Path, r.Method
			if r.Header.Get("Authorization") != "Bearer "+testToken {
				w.WriteHeader(401)
				return
			}
			b, _ := io.ReadAll(r.Body)
			_ = json.Unmarshal(b, &got)
			w.WriteHeader(status)
			return
		}
		b, _ := keyproto.AppendResponse(nil, keyproto.StateNew, []string{"2026-12"}, [][]byte{testKey})
		w.Header().Set("Content-Type", "application/json")
		w.Write(b)
	})
	pins := []pin.Pin{pin.FromCert(leaf.cert)}
	k, err, _, _ := fetch(t, []string{urlOf(s)}, pins, 1, nil)
	if err != nil {
		t.Fatal(err)
	}
	if k.State != keyproto.StateNew || len(k.IDs) != 1 || k.IDs[0] != "2026-12" {
		t.Fatalf("state %q ids %v", k.State, k.IDs)
	}
	k.Wipe()
	cfg := Config{URLs: []string{urlOf(s)}, Pins: pins, Host: "host-1", Token: []byte(testToken)}
	c := keyproto.Confirmation{Event: keyproto.EventProvisioned, Key: "2026-12"}
	if err := Confirm(t.Context(), cfg, k, c); err != nil {
		t.Fatal(err)
	}
	if gotMethod != "POST" || gotPath != "/v1/keys/host-1/confirm" || got != c {
		t.Fatalf("server saw %s %s %+v", gotMethod, gotPath, got)
	}
	status = 409
	err = Confirm(t.Context(), cfg, k, c)
	if err == nil || !strings.Contains(err.Error(), "409") {
		t.Fatalf("409 answer: %v", err)
	}
	checkNoSecret(t, "", err)
	// A server that fails the pin never sees the confirmation.
	other := makeCert(t, validTemplate("other", false), nil, nil)
	cfg.Pins = []pin.Pin{pin.FromCert(other.cert)}
	gotPath = ""
	if err := Confirm(t.Context(), cfg, k, c); err == nil || gotPath != "" {
		t.Fatalf("confirmation sent past a failed pin: %v, path %q", err, gotPath)
	}
}
