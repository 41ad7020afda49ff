package adminapi

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// Limits of the admin listener. Admin calls are small JSON requests from
// a few control-plane clients; these bound what a client with a valid
// certificate (or a stolen one) can hold. ReadHeaderTimeout also bounds the
// TLS handshake.
const (
	ReadHeaderTimeout = 5 * time.Second
	ReadTimeout       = 15 * time.Second
	WriteTimeout      = 30 * time.Second
	IdleTimeout       = 30 * time.Second
	MaxHeaderBytes    = 16 << 10
	// DefaultMaxConns bounds the admin connections served at once.
	DefaultMaxConns = 64
)

// Config is the admin listener's setup.
type Config struct {
	// Cert is the server's certificate (the key server's own by default).
	Cert tls.Certificate
	// ClientCAs verify client certificates; only clients whose
	// certificate chains to one of them, is in its validity period and
	// allows client authentication get past the handshake.
	ClientCAs *x509.CertPool
	// Handler serves the calls that get through.
	Handler *Handler
	// ErrLog receives connection-level errors; nil means log.Default().
	ErrLog *log.Logger
}

// LoadCAs reads the PEM certificates of path as a pool (serve --admin-ca).
func LoadCAs(path string) (*x509.CertPool, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("admin CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(data) {
		return nil, fmt.Errorf("admin CA %s: no PEM certificate in it", path)
	}
	return pool, nil
}

// NewServer returns the admin http.Server: HTTPS, TLS 1.2 or later, a
// client certificate required and verified against cfg.ClientCAs during
// the handshake (a client without one, or with one from another CA or
// expired, is refused there and audited), HTTP/1.1, the limits above.
func NewServer(cfg Config) (*http.Server, error) {
	if cfg.Handler == nil || cfg.Handler.Ops == nil || cfg.ClientCAs == nil || len(cfg.Cert.Certificate) == 0 {
		return nil, errors.New("adminapi.NewServer: Cert, ClientCAs and Handler with Ops are required")
	}
	if cfg.ErrLog == nil {
		cfg.ErrLog = log.Default()
	}
	h := cfg.Handler
	h.conns = &conns{h: h}
	base := &tls.Config{
		MinVersion:   tls.VersionTLS12,
		Certificates: []tls.Certificate{cfg.Cert},
		NextProtos:   []string{"http/1.1"},
		// We verify in VerifyConnection, to audit each refusal with the
		// client's address and what it presented; Go's own verification
		// (RequireAndVerifyClientCert) would refuse without telling us.
		// The CAs are still sent as acceptable issuers.
		ClientAuth: tls.RequestClientCert,
		ClientCAs:  cfg.ClientCAs,
	}
	base.GetConfigForClient = func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
		c := base.Clone()
		c.GetConfigForClient = nil
		remote := hello.Conn.RemoteAddr().String()
		c.VerifyConnection = func(cs tls.ConnectionState) error {
			return h.conns.verify(remote, cs, cfg.ClientCAs)
		}
		return c, nil
	}
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: ReadHeaderTimeout,
		ReadTimeout:       ReadTimeout,
		WriteTimeout:      WriteTimeout,
		IdleTimeout:       IdleTimeout,
		MaxHeaderBytes:    MaxHeaderBytes,
		ErrorLog:          cfg.ErrLog,
		TLSConfig:         base,
		// HTTP/1.1 only (an empty map turns HTTP/2 off): the limits above
		// are per connection, and HTTP/2 would multiplex past them.
		TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){},
		ConnContext:  h.conns.connContext,
		ConnState:    h.conns.connState,
	}
	return srv, nil
}

// conns follows admin connections, so that every connection that ends
// without a call being answered leaves an audit line: refused at the
// handshake (verify), failed in it, or rejected by net/http.
type conns struct {
	h       *Handler
	refused sync.Map // remote address -> struct{}: verify audited it
	info    sync.Map // net.Conn -> *connInfo
}

type connInfo struct {
	pending atomic.Bool // a request was started that no handler saw yet
}

type connKey struct{}

// verify checks the client certificate during the handshake.
func (cs *conns) verify(remote string, st tls.ConnectionState, roots *x509.CertPool) error {
	var leaf *x509.Certificate
	err := func() error {
		if len(st.PeerCertificates) == 0 {
			return errors.New("no client certificate")
		}
		leaf = st.PeerCertificates[0]
		inter := x509.NewCertPool()
		for _, c := range st.PeerCertificates[1:] {
			inter.AddCert(c)
		}
		_, err := leaf.Verify(x509.VerifyOptions{
			Roots:         roots,
			Intermediates: inter,
			CurrentTime:   cs.h.now(),
			KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		})
		if err != nil {
			return fmt.Errorf("client certificate: %w", err)
		}
		return nil
	}()
	if err == nil {
		return nil
	}
	cs.refused.Store(remote, struct{}{})
	if cs.h.Audit != nil {
		ev := Event{Time: cs.h.now().UTC(), Kind: EventKind, Remote: remote, Action: "connect",
			Outcome: OutcomeRefused, Reason: err.Error()}
		if leaf != nil {
			ev.Who, ev.Cert, ev.Issuer = subject(leaf), fingerprint(leaf), leaf.Issuer.String()
		}
		cs.h.Audit(ev)
	}
	return err
}

func (cs *conns) connContext(ctx context.Context, c net.Conn) context.Context {
	ci := &connInfo{}
	cs.info.Store(c, ci)
	return context.WithValue(ctx, connKey{}, ci)
}

// served marks r's connection as having reached the handler.
func (cs *conns) served(r *http.Request) {
	if cs == nil {
		return
	}
	if ci, ok := r.Context().Value(connKey{}).(*connInfo); ok {
		ci.pending.Store(false)
	}
}

func (cs *conns) connState(c net.Conn, st http.ConnState) {
	switch st {
	case http.StateActive:
		if v, ok := cs.info.Load(c); ok {
			v.(*connInfo).pending.Store(true)
		}
	case http.StateIdle:
		if v, ok := cs.info.Load(c); ok {
			v.(*connInfo).pending.Store(false)
		}
	case http.StateClosed, http.StateHijacked:
		v, _ := cs.info.LoadAndDelete(c)
		remote := c.RemoteAddr().String()
		if _, ok := cs.refused.LoadAndDelete(remote); ok {
			return // audited by verify
		}
		ev := Event{Kind: EventKind, Remote: remote, Action: "connect"}
		if tc, ok := c.(*tls.Conn); ok && !tc.ConnectionState().HandshakeComplete {
			ev.Outcome, ev.Reason = OutcomeHandshake, "connection closed before a TLS handshake completed (not TLS, an old TLS version, or no common cipher)"
		} else if ci, ok := v.(*connInfo); ok && ci.pending.Load() {
			ev.Outcome, ev.Reason = OutcomeBadRequest, "request rejected by the HTTP layer: malformed, headers over the size limit, or incomplete"
			if tc, ok := c.(*tls.Conn); ok {
				if pc := tc.ConnectionState().PeerCertificates; len(pc) > 0 {
					ev.Who, ev.Cert = subject(pc[0]), fingerprint(pc[0])
				}
			}
		} else {
			return
		}
		if cs.h.Audit != nil {
			ev.Time = cs.h.now().UTC()
			cs.h.Audit(ev)
		}
	}
}
