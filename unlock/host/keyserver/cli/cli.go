// Package cli is the unlockrd-keyserver command line, kept out of package
// main so tests can run it in-process and main stays wiring only.
package cli

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"golang.org/x/term"

	"github.com/unlockrd/unlockrd/initramfs/host/cliflag"
	"github.com/unlockrd/unlockrd/unlock/host/keyserver"
	"github.com/unlockrd/unlockrd/unlock/host/keyserver/store"
	"github.com/unlockrd/unlockrd/unlock/host/keyserver/store/etcdstore"
	"github.com/unlockrd/unlockrd/unlock/pin"
)

const prog = "unlockrd-keyserver"

const usage = `usage:
  unlockrd-keyserver serve --data DIR [--listen ADDR] [--san NAME]... [--cert F --key F]
                           [--rate N --burst N] [--host-rate N --host-burst N] [--max-conns N]
                           [--source-fail-rate N --source-fail-burst N] [--fail-rate N --fail-burst N]
                           [--source-max-conns N] [--source-conn-rate N --source-conn-burst N]
  unlockrd-keyserver init --data DIR                 create key material, print the pin
  unlockrd-keyserver pin --data DIR | --cert F       print the server's pin
  unlockrd-keyserver host add --data DIR [--key-file F|-] NAME   print the new token
  unlockrd-keyserver host list --data DIR [--json]
  unlockrd-keyserver host rotate --data DIR [--finish] NAME
  unlockrd-keyserver host revoke|reinstate --data DIR NAME
  unlockrd-keyserver host token --data DIR NAME      replace the token, print it
  unlockrd-keyserver host key --data DIR [--id ID] [--force] NAME   raw key to stdout

Every command takes --master-key PATH (or $UNLOCKRD_MASTER_KEY_FILE) to use a
master key kept outside DIR, and --lock-timeout D. Admin commands work while
serve runs on the same DIR.

Host records live in DIR/hosts.db, or with --store etcd in an etcd cluster
shared by several serve replicas (DIR then keeps this replica's master key
and TLS key): --etcd-endpoints URL[,URL...] [--etcd-prefix P]
[--etcd-cacert F] [--etcd-cert F --etcd-key F] [--etcd-user U, password in
$UNLOCKRD_ETCD_PASSWORD]. Every command takes these.
`

type env struct {
	ctx            context.Context
	stdin          io.Reader
	stdout, stderr io.Writer
	getenv         func(string) string
}

// Main runs the command line args (without the program name) and returns
// the exit status: 0 done, 1 failed, 2 bad usage.
func Main(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	e := &env{ctx: ctx, stdin: stdin, stdout: stdout, stderr: stderr, getenv: os.Getenv}
	err := e.run(args)
	code := cliflag.Status(err)
	switch {
	case errors.Is(err, flag.ErrHelp):
		fmt.Fprint(stderr, usage)
	case code == 2:
		fmt.Fprintf(stderr, "%s: %v\n%s", prog, err, usage)
	case code == 1:
		fmt.Fprintf(stderr, "%s: %v\n", prog, err)
	}
	return code
}

func (e *env) run(args []string) error {
	if len(args) == 0 {
		return fmt.Errorf("%w: no command", cliflag.ErrUsage)
	}
	switch args[0] {
	case "serve":
		return e.serve(args[1:])
	case "init":
		return e.init(args[1:])
	case "pin":
		return e.pin(args[1:])
	case "host":
		if len(args) < 2 {
			return fmt.Errorf("%w: host needs a subcommand", cliflag.ErrUsage)
		}
		return e.host(args[1], args[2:])
	case "help", "-h", "--help":
		return flag.ErrHelp
	}
	return fmt.Errorf("%w: unknown command %q", cliflag.ErrUsage, args[0])
}

// common holds the flags every command takes.
type common struct {
	data, masterKey string
	lockTimeout     time.Duration
	storeKind       string
	etcd            etcdFlags
}

// etcdFlags select and reach an etcd cluster (--store etcd).
type etcdFlags struct {
	endpoints, prefix         string
	caFile, certFile, keyFile string
	user                      string
}

// EtcdPasswordEnv holds the etcd password for --etcd-user; a flag would
// show it in the process list.
const EtcdPasswordEnv = "UNLOCKRD_ETCD_PASSWORD"

func (e *env) flags(name string, c *common) *flag.FlagSet {
	// Usage errors carry their message; Main prints it with the usage.
	fs := cliflag.NewFlagSet(name, io.Discard)
	fs.StringVar(&c.data, "data", "", "data folder")
	fs.StringVar(&c.masterKey, "master-key", e.getenv(keyserver.MasterKeyEnv), "master key file (default DIR/master.key)")
	fs.DurationVar(&c.lockTimeout, "lock-timeout", 10*time.Second, "how long to wait for the data file's lock, or for etcd")
	fs.StringVar(&c.storeKind, "store", "bolt", "where host records live: bolt (DIR/hosts.db) or etcd")
	fs.StringVar(&c.etcd.endpoints, "etcd-endpoints", "", "etcd client URLs, comma-separated (--store etcd)")
	fs.StringVar(&c.etcd.prefix, "etcd-prefix", etcdstore.DefaultPrefix, "key prefix of this key service in etcd")
	fs.StringVar(&c.etcd.caFile, "etcd-cacert", "", "CA certificate (PEM) that signed the etcd members' certificates")
	fs.StringVar(&c.etcd.certFile, "etcd-cert", "", "client certificate (PEM) for etcd")
	fs.StringVar(&c.etcd.keyFile, "etcd-key", "", "client key (PEM) for --etcd-cert")
	fs.StringVar(&c.etcd.user, "etcd-user", "", "etcd user (password from $"+EtcdPasswordEnv+")")
	return fs
}

// etcdOptions turns the --etcd-* flags into store options; nil for --store bolt.
func (e *env) etcdOptions(c *common) (*etcdstore.Options, error) {
	switch c.storeKind {
	case "bolt":
		if c.etcd.endpoints != "" {
			return nil, fmt.Errorf("%w: --etcd-endpoints needs --store etcd", cliflag.ErrUsage)
		}
		return nil, nil
	case "etcd":
	default:
		return nil, fmt.Errorf("%w: --store %q: want bolt or etcd", cliflag.ErrUsage, c.storeKind)
	}
	var eps []string
	for _, ep := range strings.Split(c.etcd.endpoints, ",") {
		if ep = strings.TrimSpace(ep); ep != "" {
			eps = append(eps, ep)
		}
	}
	if len(eps) == 0 {
		return nil, fmt.Errorf("%w: --store etcd needs --etcd-endpoints URL[,URL...]", cliflag.ErrUsage)
	}
	o := &etcdstore.Options{Endpoints: eps, Prefix: c.etcd.prefix}
	if c.etcd.user != "" {
		o.Username, o.Password = c.etcd.user, e.getenv(EtcdPasswordEnv)
	}
	if c.etcd.caFile != "" || c.etcd.certFile != "" {
		if (c.etcd.certFile == "") != (c.etcd.keyFile == "") {
			return nil, fmt.Errorf("%w: --etcd-cert and --etcd-key go together", cliflag.ErrUsage)
		}
		tc := &tls.Config{MinVersion: tls.VersionTLS12}
		if c.etcd.caFile != "" {
			pem, err := os.ReadFile(c.etcd.caFile)
			if err != nil {
				return nil, fmt.Errorf("etcd CA: %w", err)
			}
			tc.RootCAs = x509.NewCertPool()
			if !tc.RootCAs.AppendCertsFromPEM(pem) {
				return nil, fmt.Errorf("etcd CA %s: no PEM certificate", c.etcd.caFile)
			}
		}
		if c.etcd.certFile != "" {
			cert, err := tls.LoadX509KeyPair(c.etcd.certFile, c.etcd.keyFile)
			if err != nil {
				return nil, fmt.Errorf("etcd client certificate %s / key %s: %w", c.etcd.certFile, c.etcd.keyFile, err)
			}
			tc.Certificates = []tls.Certificate{cert}
		}
		o.TLS = tc
	}
	return o, nil
}

func (e *env) open(c *common, create bool) (*keyserver.Data, error) {
	if c.data == "" {
		return nil, fmt.Errorf("%w: --data DIR is required", cliflag.ErrUsage)
	}
	eo, err := e.etcdOptions(c)
	if err != nil {
		return nil, err
	}
	return keyserver.OpenData(e.ctx, c.data, keyserver.DataOptions{
		Create:        create,
		MasterKeyPath: c.masterKey,
		LockTimeout:   c.lockTimeout,
		Etcd:          eo,
	})
}

// listenSANs names the server as clients will reach it: the listen host,
// or the machine's name when listening on every address.
func listenSANs(addr string) []string {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		if hn, err := os.Hostname(); err == nil && hn != "" {
			return []string{hn}
		}
		return nil
	}
	return []string{host}
}

func (e *env) serve(args []string) error {
	var c common
	fs := e.flags("serve", &c)
	listen := fs.String("listen", ":8443", "address to listen on")
	certFile := fs.String("cert", "", "TLS certificate chain (PEM) instead of the folder's own")
	keyFile := fs.String("key", "", "TLS private key (PEM) for --cert")
	var sans cliflag.Multi
	fs.Var(&sans, "san", "extra name or address for the generated certificate (repeatable)")
	rateF := fs.Float64("rate", keyserver.DefaultGlobalLimit.PerSecond, "key requests per second, all hosts (0: no limit)")
	burst := fs.Int("burst", keyserver.DefaultGlobalLimit.Burst, "burst of key requests, all hosts")
	hostRate := fs.Float64("host-rate", keyserver.DefaultHostLimit.PerSecond, "key requests per second per host (0: no limit)")
	hostBurst := fs.Int("host-burst", keyserver.DefaultHostLimit.Burst, "burst of key requests per host")
	srcFailRate := fs.Float64("source-fail-rate", keyserver.DefaultSourceFailLimit.PerSecond, "failed key requests per second per source address (0: no limit)")
	srcFailBurst := fs.Int("source-fail-burst", keyserver.DefaultSourceFailLimit.Burst, "burst of failed key requests per source address")
	failRate := fs.Float64("fail-rate", keyserver.DefaultFailLimit.PerSecond, "failed key requests per second, all sources (0: no limit)")
	failBurst := fs.Int("fail-burst", keyserver.DefaultFailLimit.Burst, "burst of failed key requests, all sources")
	srcMaxConns := fs.Int("source-max-conns", keyserver.DefaultSourceLimits.MaxConns, "connections open at once per source address (0: no limit)")
	srcConnRate := fs.Float64("source-conn-rate", keyserver.DefaultSourceLimits.Conns.PerSecond, "new connections per second per source address (0: no limit)")
	srcConnBurst := fs.Int("source-conn-burst", keyserver.DefaultSourceLimits.Conns.Burst, "burst of new connections per source address")
	grace := fs.Duration("grace", 10*time.Second, "how long requests in flight may finish on shutdown")
	maxConns := fs.Int("max-conns", keyserver.DefaultMaxConns, "connections served at once; more wait in the listen queue (0: no limit)")
	pos, err := cliflag.Parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 0 {
		return fmt.Errorf("%w: serve takes no arguments, got %q", cliflag.ErrUsage, pos)
	}
	if (*certFile == "") != (*keyFile == "") {
		return fmt.Errorf("%w: --cert and --key go together", cliflag.ErrUsage)
	}

	d, err := e.open(&c, true)
	if err != nil {
		if errors.Is(err, cliflag.ErrUsage) {
			return err
		}
		return fmt.Errorf("serve: refusing to start: %w", err)
	}
	defer d.Close()
	n, probs, err := d.Verify(e.ctx)
	if err != nil {
		return fmt.Errorf("serve: refusing to start: %w", err)
	}
	logger := log.New(e.stderr, prog+": ", log.LstdFlags)
	for _, p := range probs {
		logger.Printf("WARNING: host %q will get 500s: %v", p.Host, p.Err)
	}

	var cert tls.Certificate
	if *certFile != "" {
		if cert, err = keyserver.LoadKeyPair(*certFile, *keyFile); err != nil {
			return fmt.Errorf("serve: TLS certificate %s / key %s: %w", *certFile, *keyFile, err)
		}
	} else if cert, _, err = d.TLS(append(listenSANs(*listen), sans...), true); err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	p, err := keyserver.PinOf(cert)
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}

	h, err := keyserver.New(
		keyserver.WithStore(d.Store),
		keyserver.WithSealer(d.Sealer),
		keyserver.WithLogger(logger),
		keyserver.WithAudit(keyserver.JSONAudit(e.stderr)),
		keyserver.WithGlobalLimit(keyserver.Limit{PerSecond: *rateF, Burst: *burst}),
		keyserver.WithHostLimit(keyserver.Limit{PerSecond: *hostRate, Burst: *hostBurst}),
		keyserver.WithSourceFailLimit(keyserver.Limit{PerSecond: *srcFailRate, Burst: *srcFailBurst}),
		keyserver.WithFailLimit(keyserver.Limit{PerSecond: *failRate, Burst: *failBurst}),
	)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	// Per source first: a source over its limits is refused without
	// taking one of the --max-conns slots.
	ln = keyserver.SourceListener(ln, keyserver.SourceLimits{
		MaxConns: *srcMaxConns,
		Conns:    keyserver.Limit{PerSecond: *srcConnRate, Burst: *srcConnBurst},
	}, logger)
	ln = keyserver.LimitListener(ln, *maxConns)
	srv := keyserver.NewHTTPServer(h, cert, log.New(e.stderr, prog+": http: ", log.LstdFlags))
	// Printed only once we listen, so whoever starts us can connect as
	// soon as it has read these lines.
	fmt.Fprintf(e.stdout, "pin: %s\nlisten: %s\n", p, ln.Addr())
	logger.Printf("serving %d hosts on https://%s (%s, master key %s)", n, ln.Addr(), d.Where, d.Sealer.ID())
	err = keyserver.Serve(e.ctx, srv, ln, *grace)
	logger.Printf("stopped")
	return err
}

func (e *env) init(args []string) error {
	var c common
	fs := e.flags("init", &c)
	var sans cliflag.Multi
	fs.Var(&sans, "san", "extra name or address for the certificate (repeatable)")
	pos, err := cliflag.Parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 0 {
		return fmt.Errorf("%w: init takes no arguments", cliflag.ErrUsage)
	}
	d, err := e.open(&c, true)
	if err != nil {
		return err
	}
	defer d.Close()
	_, p, err := d.TLS(sans, true)
	if err != nil {
		return err
	}
	fmt.Fprintln(e.stdout, p)
	return nil
}

func (e *env) pin(args []string) error {
	var c common
	fs := e.flags("pin", &c)
	certFile := fs.String("cert", "", "print the pin of this PEM certificate instead")
	pos, err := cliflag.Parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 0 {
		return fmt.Errorf("%w: pin takes no arguments", cliflag.ErrUsage)
	}
	switch {
	case *certFile != "":
		data, err := os.ReadFile(*certFile)
		if err != nil {
			return err
		}
		p, err := pin.FromPEM(data)
		if err != nil {
			return fmt.Errorf("%s: %w", *certFile, err)
		}
		fmt.Fprintln(e.stdout, p)
	case c.data != "":
		p, err := keyserver.DataPin(c.data)
		if err != nil {
			return err
		}
		fmt.Fprintln(e.stdout, p)
	default:
		return fmt.Errorf("%w: pin needs --data DIR or --cert FILE", cliflag.ErrUsage)
	}
	return nil
}

func (e *env) host(sub string, args []string) error {
	var c common
	fs := e.flags("host "+sub, &c)
	keyFile := fs.String("key-file", "", "add: enroll this existing key (- for stdin) instead of a random one")
	asJSON := fs.Bool("json", false, "list: JSON output")
	finish := fs.Bool("finish", false, "rotate: drop every key but the current one")
	keyID := fs.String("id", "", "key: print this key instead of the current one")
	force := fs.Bool("force", false, "key: write even to a terminal")
	pos, err := cliflag.Parse(fs, args)
	if err != nil {
		return err
	}
	want := 1
	if sub == "list" {
		want = 0
	}
	if len(pos) != want {
		return fmt.Errorf("%w: host %s takes %d argument(s), got %d", cliflag.ErrUsage, sub, want, len(pos))
	}
	var name string
	if want == 1 {
		name = pos[0]
		if err := keyserver.ValidHostID(name); err != nil {
			return err
		}
	}
	switch sub {
	case "add", "list", "rotate", "revoke", "reinstate", "token", "key":
	default:
		return fmt.Errorf("%w: unknown host command %q", cliflag.ErrUsage, sub)
	}

	d, err := e.open(&c, sub == "add")
	if err != nil {
		return err
	}
	defer d.Close()
	a := d.Admin()
	ctx := e.ctx
	switch sub {
	case "add":
		var key []byte
		if *keyFile != "" {
			if key, err = e.readKeyFile(*keyFile); err != nil {
				return err
			}
			defer clear(key)
		}
		token, err := a.AddHost(ctx, name, key)
		if err != nil {
			return err
		}
		// Alone on stdout, so `TOKEN=$(... host add ...)` captures it.
		fmt.Fprintln(e.stdout, token)
		fmt.Fprintf(e.stderr, "%s: host %q added; the token above is shown only once\n", prog, name)
	case "list":
		hosts, err := d.Store.List(ctx)
		if err != nil {
			return err
		}
		return e.list(hosts, *asJSON)
	case "rotate":
		if *finish {
			dropped, err := a.FinishRotation(ctx, name)
			if err != nil {
				return err
			}
			if len(dropped) == 0 {
				fmt.Fprintf(e.stderr, "%s: host %q: no rotation in progress\n", prog, name)
			} else {
				fmt.Fprintf(e.stderr, "%s: host %q: dropped key(s) %s\n", prog, name, strings.Join(dropped, ", "))
			}
			return nil
		}
		kid, err := a.Rotate(ctx, name)
		if err != nil {
			return err
		}
		fmt.Fprintln(e.stdout, kid)
		fmt.Fprintf(e.stderr, "%s: host %q: new current key %s; the previous key is served second until `host rotate %s --finish`\n",
			prog, name, kid, name)
	case "revoke", "reinstate":
		st := store.Revoked
		if sub == "reinstate" {
			st = store.Active
		}
		if err := a.SetState(ctx, name, st); err != nil {
			return err
		}
		fmt.Fprintf(e.stderr, "%s: host %q is %s\n", prog, name, st)
	case "token":
		token, err := a.NewToken(ctx, name)
		if err != nil {
			return err
		}
		fmt.Fprintln(e.stdout, token)
		fmt.Fprintf(e.stderr, "%s: host %q has a new token; the old one no longer works\n", prog, name)
	case "key":
		if f, ok := e.stdout.(interface{ Fd() uintptr }); ok && !*force && term.IsTerminal(int(f.Fd())) {
			return errors.New("host key: refusing to write a raw key to a terminal (redirect stdout, or --force)")
		}
		ids, keys, err := a.Keys(ctx, name)
		if err != nil {
			return err
		}
		defer func() {
			for _, k := range keys {
				clear(k)
			}
		}()
		i := 0
		if *keyID != "" {
			i = -1
			for j, id := range ids {
				if id == *keyID {
					i = j
				}
			}
			if i < 0 {
				return fmt.Errorf("host %q has no key %q (has %s)", name, *keyID, strings.Join(ids, ", "))
			}
		}
		if _, err := e.stdout.Write(keys[i]); err != nil {
			return fmt.Errorf("host %q: write key: %w", name, err)
		}
	}
	return nil
}

func (e *env) readKeyFile(path string) ([]byte, error) {
	var r io.Reader = e.stdin
	if path != "-" {
		f, err := os.Open(path)
		if err != nil {
			return nil, fmt.Errorf("key file: %w", err)
		}
		defer f.Close()
		r = f
	}
	// One byte more than allowed, to tell "too big" from "exactly the limit".
	key, err := io.ReadAll(io.LimitReader(r, keyserver.MaxKeySize+1))
	if err != nil {
		clear(key)
		return nil, fmt.Errorf("key file %s: %w", path, err)
	}
	return key, nil
}

type listEntry struct {
	Host    string    `json:"host"`
	State   string    `json:"state"`
	Keys    []string  `json:"keys"`
	Created time.Time `json:"created"`
	Updated time.Time `json:"updated"`
}

func (e *env) list(hosts []store.Host, asJSON bool) error {
	entries := make([]listEntry, 0, len(hosts))
	for _, h := range hosts {
		le := listEntry{Host: h.ID, State: string(h.Lifecycle()), Created: h.Created, Updated: h.Updated, Keys: []string{}}
		for _, k := range h.Keys {
			le.Keys = append(le.Keys, k.ID)
		}
		entries = append(entries, le)
	}
	if asJSON {
		enc := json.NewEncoder(e.stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(entries)
	}
	tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "HOST\tSTATE\tKEYS\tUPDATED")
	for _, le := range entries {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", le.Host, le.State, strings.Join(le.Keys, ","), le.Updated.Format(time.RFC3339))
	}
	return tw.Flush()
}
