package keyserver

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/unlockrd/unlockrd/unlock/keyproto"
	"github.com/unlockrd/unlockrd/unlock/pin"
)

// PinnedClient returns an HTTP client that trusts a server only if its
// leaf key matches one of pins, and never follows redirects. It is a test
// and tooling helper; the boot code has its own client (unlock/keys).
func PinnedClient(pins ...pin.Pin) *http.Client {
	return &http.Client{
		Timeout: 10 * time.Second,
		CheckRedirect: func(*http.Request, []*http.Request) error {
			return http.ErrUseLastResponse
		},
		Transport: &http.Transport{
			TLSClientConfig: &tls.Config{
				MinVersion: tls.VersionTLS12,
				// Verification is the pin check below, not the CA system.
				InsecureSkipVerify: true,
				VerifyConnection: func(cs tls.ConnectionState) error {
					if len(cs.PeerCertificates) == 0 || !pin.Match(pin.FromCert(cs.PeerCertificates[0]), pins) {
						return errors.New("server key matches no pin")
					}
					return nil
				},
			},
		},
	}
}

// Fetch GETs a key URL with a bearer token and decodes a 200 answer. For
// other statuses it returns the status and no error.
func Fetch(ctx context.Context, c *http.Client, url, token string) (ids []string, keys [][]byte, status int, err error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, nil, 0, err
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := c.Do(req)
	if err != nil {
		return nil, nil, 0, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, keyproto.MaxBody+1))
	defer clear(body)
	if err != nil {
		return nil, nil, resp.StatusCode, fmt.Errorf("%s: %w", url, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, nil, resp.StatusCode, nil
	}
	keys, err = keyproto.Decode(resp.Header.Get("Content-Type"), body)
	if err != nil {
		return nil, nil, resp.StatusCode, fmt.Errorf("%s: %w", url, err)
	}
	// Only the ids: decoding the keys again would leave copies in strings.
	var r struct {
		Keys []struct {
			ID string `json:"id"`
		} `json:"keys"`
	}
	if err := json.Unmarshal(body, &r); err == nil {
		for _, k := range r.Keys {
			ids = append(ids, k.ID)
		}
	}
	return ids, keys, resp.StatusCode, nil
}
