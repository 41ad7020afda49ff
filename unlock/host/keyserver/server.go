package keyserver

import (
	"context"
	"crypto/tls"
	"errors"
	"github.com/unlockrd/unlockrd/unlock/keyproto"
	"log"
	"net"
	"net/http"
	"time"

	"golang.org/x/net/netutil"
)

// Limits of the HTTP server. Key requests are one small GET; anything
// slower or bigger is a misbehaving or hostile client. ReadHeaderTimeout
// also bounds the TLS handshake (net/http applies it there).
const (
	ReadHeaderTimeout = 5 * time.Second
	ReadTimeout       = 10 * time.Second
	WriteTimeout      = 10 * time.Second
	IdleTimeout       = time.Second
	MaxHeaderBytes    = 8 << 10
)

// DefaultMaxConns bounds the connections served at once. Beyond it new
// connections wait in the kernel's listen queue, costing the server
// nothing, so its memory stays bounded however many hosts boot at once:
// about 50 KiB per TLS connection, so some 60 MiB at this default.
const DefaultMaxConns = 1024

// LimitListener returns ln accepting at most n connections at once (n <= 0:
// no limit).
func LimitListener(ln net.Listener, n int) net.Listener {
	if n <= 0 {
		return ln
	}
	return netutil.LimitListener(ln, n)
}

// NewHTTPServer wraps h in an http.Server with the timeouts and header
// limit above and TLS 1.2+ with cert. errLog receives connection-level
// errors (handshake failures); nil means log.Default().
//
// It speaks HTTP/1.1 only, one request per connection. The boot client
// speaks nothing else and makes one request per connection; HTTP/2 would
// let one connection carry many requests, each holding a handler and its
// buffers (the server's connection cap would bound nothing), and a
// kept-alive idle connection holds a slot of that cap for no work.
func NewHTTPServer(h http.Handler, cert tls.Certificate, errLog *log.Logger) *http.Server {
	if errLog == nil {
		errLog = log.Default()
	}
	srv := &http.Server{
		Handler:           http.MaxBytesHandler(h, keyproto.MaxConfirmBody), // only a confirmation has a body
		ReadHeaderTimeout: ReadHeaderTimeout,
		ReadTimeout:       ReadTimeout,
		WriteTimeout:      WriteTimeout,
		IdleTimeout:       IdleTimeout,
		MaxHeaderBytes:    MaxHeaderBytes,
		ErrorLog:          errLog,
		TLSConfig: &tls.Config{
			MinVersion:   tls.VersionTLS12,
			Certificates: []tls.Certificate{cert},
			NextProtos:   []string{"http/1.1"},
		},
		// A non-nil empty map turns net/http's HTTP/2 off.
		TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){},
	}
	srv.SetKeepAlivesEnabled(false) // "Connection: close" on every answer
	if cw, ok := h.(connWatcher); ok {
		srv.ConnContext, srv.ConnState = cw.ConnContext, cw.ConnState
	}
	return srv
}

// connWatcher is a handler that wants to see connections come and go
// (Handler does, to audit requests net/http rejects on its own).
type connWatcher interface {
	ConnContext(ctx context.Context, c net.Conn) context.Context
	ConnState(c net.Conn, st http.ConnState)
}

// Serve runs srv over TLS on ln until ctx is done, then shuts down,
// letting requests in flight finish for up to grace.
func Serve(ctx context.Context, srv *http.Server, ln net.Listener, grace time.Duration) error {
	errc := make(chan error, 1)
	go func() { errc <- srv.ServeTLS(ln, "", "") }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	err := srv.Shutdown(sctx)
	if serr := <-errc; !errors.Is(serr, http.ErrServerClosed) && err == nil {
		err = serr
	}
	return err
}
