package adminapi

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/unlockrd/unlockrd/unlock/host/keyserver"
	"github.com/unlockrd/unlockrd/unlock/host/keyserver/store"
)

// maxAnswer bounds an answer the client reads: a list of many hosts.
const maxAnswer = 64 << 20

// Client calls a remote admin API; it implements Ops.
type Client struct {
	base string // https://host:port, no trailing slash
	hc   *http.Client
}

var _ Ops = (*Client)(nil)

// Error is an answer other than 2xx. Its message is the server's, which
// names the host and field at fault.
type Error struct {
	Status int
	ErrorBody
}

func (e *Error) Error() string { return e.ErrorBody.Error }

// Is maps answers back to the store's and keyserver's errors, so callers
// test remote and local errors alike.
func (e *Error) Is(target error) bool {
	switch e.Status {
	case http.StatusNotFound:
		return target == store.ErrNotFound
	case http.StatusServiceUnavailable:
		return target == store.ErrBusy
	case http.StatusConflict:
		return target == store.ErrExists || target == keyserver.ErrRotating
	}
	return false
}

// NewClient returns a client of the admin API at server (https://host:port)
// presenting the client certificate certFile/keyFile (the key file must
// not be readable by group or others) and trusting the server if its
// certificate chains to caFile (the key server's own tls.crt will do, or
// the CA that issued serve --admin-cert).
func NewClient(server, certFile, keyFile, caFile string) (*Client, error) {
	u, err := url.Parse(server)
	if err != nil || u.Scheme != "https" || u.Host == "" || (u.Path != "" && u.Path != "/") || u.RawQuery != "" {
		return nil, fmt.Errorf("--server %q: want https://HOST:PORT", server)
	}
	if certFile == "" || keyFile == "" || caFile == "" {
		return nil, errors.New("--server needs --cert, --key (the client certificate and its key) and --ca (what the server's certificate chains to)")
	}
	cert, err := keyserver.LoadKeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("client certificate %s / key %s: %w", certFile, keyFile, err)
	}
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("--ca: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("--ca %s: no PEM certificate in it", caFile)
	}
	return &Client{
		base: "https://" + u.Host,
		hc: &http.Client{
			Timeout: time.Minute,
			CheckRedirect: func(*http.Request, []*http.Request) error {
				return http.ErrUseLastResponse
			},
			Transport: &http.Transport{
				TLSClientConfig: &tls.Config{
					MinVersion: tls.VersionTLS12,
					RootCAs:    roots,
					// Sent even when the server names other CAs, so a
					// client with the wrong certificate shows up by name
					// in the server's audit instead of as "no certificate".
					GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
						return &cert, nil
					},
				},
				ForceAttemptHTTP2: false,
			},
		},
	}, nil
}

// call sends body (if not nil) as JSON and decodes a 2xx answer into out.
func (c *Client) call(ctx context.Context, method, path string, body, out any) error {
	var rd io.Reader
	var raw []byte
	if body != nil {
		var err error
		if raw, err = json.Marshal(body); err != nil {
			return err
		}
		defer clear(raw) // may hold a key
		rd = bytes.NewReader(raw)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, rd)
	if err != nil {
		return err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return fmt.Errorf("admin server %s: %w", c.base, err)
	}
	defer resp.Body.Close()
	ans, err := io.ReadAll(io.LimitReader(resp.Body, maxAnswer))
	defer clear(ans) // an export's keys are in it
	if err != nil {
		return fmt.Errorf("admin server %s: reading the answer: %w", c.base, err)
	}
	if resp.StatusCode/100 != 2 {
		e := &Error{Status: resp.StatusCode}
		if json.Unmarshal(ans, &e.ErrorBody) != nil || e.ErrorBody.Error == "" {
			e.ErrorBody.Error = fmt.Sprintf("admin server %s: %s", c.base, resp.Status)
		}
		return e
	}
	if err := json.Unmarshal(ans, out); err != nil {
		return fmt.Errorf("admin server %s: answer to %s %s: %w", c.base, method, path, err)
	}
	return nil
}

func hostPath(id string, action ...string) string {
	return HostsPath + "/" + url.PathEscape(id) + strings.Join(append([]string{""}, action...), "/")
}

// Add implements Ops.
func (c *Client) Add(ctx context.Context, id string, key []byte) (Added, error) {
	var a Added
	err := c.call(ctx, http.MethodPost, HostsPath, AddRequest{Host: id, Key: key}, &a)
	return a, err
}

// Rotate implements Ops.
func (c *Client) Rotate(ctx context.Context, id string) (string, error) {
	var r struct {
		KeyID string `json:"key_id"`
	}
	err := c.call(ctx, http.MethodPost, hostPath(id, ActionRotate), nil, &r)
	return r.KeyID, err
}

// Finish implements Ops.
func (c *Client) Finish(ctx context.Context, id string) ([]string, error) {
	var r struct {
		Dropped []string `json:"dropped"`
	}
	err := c.call(ctx, http.MethodPost, hostPath(id, ActionFinish), nil, &r)
	if len(r.Dropped) == 0 {
		r.Dropped = nil
	}
	return r.Dropped, err
}

// SetState implements Ops.
func (c *Client) SetState(ctx context.Context, id string, st store.State) (HostInfo, error) {
	action := ActionRevoke
	switch st {
	case store.Revoked:
	case store.Active:
		action = ActionReinstate
	default:
		return HostInfo{}, fmt.Errorf("host %q: unknown state %q", id, st)
	}
	var hi HostInfo
	err := c.call(ctx, http.MethodPost, hostPath(id, action), nil, &hi)
	return hi, err
}

// NewToken implements Ops.
func (c *Client) NewToken(ctx context.Context, id string) (string, error) {
	var r struct {
		Token string `json:"token"`
	}
	err := c.call(ctx, http.MethodPost, hostPath(id, ActionToken), nil, &r)
	return r.Token, err
}

// Export implements Ops.
func (c *Client) Export(ctx context.Context, id string) ([]string, [][]byte, error) {
	var ex Export
	if err := c.call(ctx, http.MethodPost, hostPath(id, ActionExport), nil, &ex); err != nil {
		return nil, nil, err
	}
	ids := make([]string, len(ex.Keys))
	keys := make([][]byte, len(ex.Keys))
	for i, k := range ex.Keys {
		ids[i], keys[i] = k.ID, k.Key
	}
	if len(keys) == 0 {
		return nil, nil, fmt.Errorf("host %q has no keys", id)
	}
	return ids, keys, nil
}

// Get implements Ops.
func (c *Client) Get(ctx context.Context, id string) (HostInfo, error) {
	var hi HostInfo
	err := c.call(ctx, http.MethodGet, hostPath(id), nil, &hi)
	return hi, err
}

// List implements Ops.
func (c *Client) List(ctx context.Context) ([]HostInfo, error) {
	var r struct {
		Hosts []HostInfo `json:"hosts"`
	}
	err := c.call(ctx, http.MethodGet, HostsPath, nil, &r)
	return r.Hosts, err
}
