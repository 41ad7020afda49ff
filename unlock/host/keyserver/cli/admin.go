package cli

import (
	"context"
	"crypto/tls"
	"flag"
	"fmt"
	"log"
	"net"
	"time"

	"github.com/unlockrd/unlockrd/initramfs/host/cliflag"
	"github.com/unlockrd/unlockrd/unlock/host/keyserver"
	"github.com/unlockrd/unlockrd/unlock/host/keyserver/adminapi"
)

// adminFlags are serve's --admin-* flags: the admin API's listener.
type adminFlags struct {
	listen, ca        string
	certFile, keyFile string
	allowExport       bool
	maxConns          int
}

func (af *adminFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&af.listen, "admin-listen", "", "address of the admin API (mutual TLS; off when empty)")
	fs.StringVar(&af.ca, "admin-ca", "", "CA certificate(s) (PEM) that admin clients' certificates must chain to")
	fs.StringVar(&af.certFile, "admin-cert", "", "TLS certificate chain (PEM) of the admin listener (default: the key server's)")
	fs.StringVar(&af.keyFile, "admin-key", "", "TLS private key (PEM) for --admin-cert")
	fs.BoolVar(&af.allowExport, "admin-allow-export", false, "let admin clients export hosts' keys (audited)")
	fs.IntVar(&af.maxConns, "admin-max-conns", adminapi.DefaultMaxConns, "admin connections served at once (0: no limit)")
}

func (af *adminFlags) check() error {
	switch {
	case af.listen == "" && (af.ca != "" || af.certFile != "" || af.allowExport):
		return fmt.Errorf("%w: --admin-ca, --admin-cert and --admin-allow-export need --admin-listen", cliflag.ErrUsage)
	case af.listen != "" && af.ca == "":
		return fmt.Errorf("%w: --admin-listen needs --admin-ca CA.pem (the CA of the admin clients' certificates)", cliflag.ErrUsage)
	case (af.certFile == "") != (af.keyFile == ""):
		return fmt.Errorf("%w: --admin-cert and --admin-key go together", cliflag.ErrUsage)
	}
	return nil
}

// start opens the admin listener if --admin-listen is set and serves it
// until the returned stop is called (it waits for the server to end, up
// to grace). cert is the key server's certificate, used unless
// --admin-cert is given.
func (af *adminFlags) start(e *env, d *keyserver.Data, cert tls.Certificate, logger *log.Logger, grace time.Duration) (stop func(), err error) {
	if af.listen == "" {
		return func() {}, nil
	}
	cas, err := adminapi.LoadCAs(af.ca)
	if err != nil {
		return nil, err
	}
	if af.certFile != "" {
		if cert, err = keyserver.LoadKeyPair(af.certFile, af.keyFile); err != nil {
			return nil, fmt.Errorf("admin TLS certificate %s / key %s: %w", af.certFile, af.keyFile, err)
		}
	}
	srv, err := adminapi.NewServer(adminapi.Config{
		Cert:      cert,
		ClientCAs: cas,
		Handler: &adminapi.Handler{
			Ops:         adminapi.Local{Admin: d.Admin()},
			AllowExport: af.allowExport,
			Audit:       keyserver.JSONLines[adminapi.Event](e.stderr),
		},
		ErrLog: log.New(e.stderr, prog+": admin http: ", log.LstdFlags),
	})
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", af.listen)
	if err != nil {
		return nil, fmt.Errorf("--admin-listen: %w", err)
	}
	ln = keyserver.LimitListener(ln, af.maxConns)
	ctx, cancel := context.WithCancel(e.ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := keyserver.Serve(ctx, srv, ln, grace); err != nil {
			logger.Printf("admin API: %v", err)
		}
	}()
	fmt.Fprintf(e.stdout, "admin: %s\n", ln.Addr())
	export := "disabled"
	if af.allowExport {
		export = "allowed"
	}
	logger.Printf("admin API on https://%s (client certificates from %s, key export %s)", ln.Addr(), af.ca, export)
	return func() { cancel(); <-done }, nil
}

// remoteFlags let host commands go through a server's admin API.
type remoteFlags struct {
	server, cert, key, ca string
}

func (rf *remoteFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&rf.server, "server", "", "admin API URL (https://HOST:PORT) instead of --data")
	fs.StringVar(&rf.cert, "cert", "", "client certificate (PEM) for --server")
	fs.StringVar(&rf.key, "key", "", "client private key (PEM, mode 600) for --cert")
	fs.StringVar(&rf.ca, "ca", "", "CA certificate (PEM) the server's certificate chains to (the server's tls.crt will do)")
}

// ops returns what the host commands act on: the admin API with --server,
// else the data folder; done releases it.
func (e *env) ops(c *common, rf *remoteFlags, create bool) (adminapi.Ops, func(), error) {
	if rf.server == "" {
		if rf.cert != "" || rf.key != "" || rf.ca != "" {
			return nil, nil, fmt.Errorf("%w: --cert, --key and --ca go with --server", cliflag.ErrUsage)
		}
		d, err := e.open(c, create)
		if err != nil {
			return nil, nil, err
		}
		return adminapi.Local{Admin: d.Admin()}, func() { d.Close() }, nil
	}
	if c.data != "" {
		return nil, nil, fmt.Errorf("%w: --server and --data exclude each other", cliflag.ErrUsage)
	}
	cl, err := adminapi.NewClient(rf.server, rf.cert, rf.key, rf.ca)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %v", cliflag.ErrUsage, err)
	}
	return cl, func() {}, nil
}
