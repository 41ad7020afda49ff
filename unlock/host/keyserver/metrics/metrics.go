// Package metrics exposes the key server to Prometheus: requests by
// outcome, latencies of key requests, TLS handshakes and store
// operations, connections in use, the store's (etcd's) health and the
// last-seen recorder's backlog. Everything registers on a registry the
// caller passes (never the client library's global default), and is fed
// from the outside of the handler: the audit stream, a store wrapper and
// http.Server hooks, so serving code does not know about Prometheus.
package metrics

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/unlockrd/unlockrd/initramfs/ulog"
	"github.com/unlockrd/unlockrd/unlock/host/keyserver"
)

// Namespace prefixes every metric name.
const Namespace = "unlockrd"

// Path is where Handler answers.
const Path = "/metrics"

// latencyBuckets span an in-memory answer (0.1 ms) to a store about to
// time out (several seconds).
var latencyBuckets = prometheus.ExponentialBuckets(0.0001, 2.5, 12)

// Metrics are the key server's collectors. Build them with New.
type Metrics struct {
	reg *prometheus.Registry

	requests    *prometheus.CounterVec
	keyLatency  *prometheus.HistogramVec
	retryAfter  *prometheus.CounterVec
	handshakes  prometheus.Histogram
	connsInUse  prometheus.Gauge
	connsTotal  prometheus.Counter
	storeOps    *prometheus.HistogramVec
	storeUp     *prometheus.GaugeVec
	etcdMembers *prometheus.GaugeVec
}

// New registers the key server's metrics, and the Go runtime and process
// collectors, on reg.
func New(reg *prometheus.Registry) (*Metrics, error) {
	m := &Metrics{
		reg: reg,
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: Namespace, Name: "requests_total",
			Help: "Requests answered by the key service, by outcome (ok, unknown_host, revoked, bad_token, no_token, rate_limited, busy, error, ...) and HTTP status (0: rejected by the HTTP layer).",
		}, []string{"outcome", "status"}),
		keyLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: Namespace, Name: "key_request_duration_seconds",
			Help:    "Time from a key request's arrival to its answer, by outcome.",
			Buckets: latencyBuckets,
		}, []string{"outcome"}),
		retryAfter: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: Namespace, Name: "retry_after_total",
			Help: "Answers telling the client to come back later: 429 (a rate limit) and 503 (store busy).",
		}, []string{"status"}),
		handshakes: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: Namespace, Name: "tls_handshake_duration_seconds",
			Help:    "Server side of completed TLS handshakes: from the ClientHello to the server's last flight.",
			Buckets: latencyBuckets,
		}),
		connsInUse: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: Namespace, Name: "connections_in_use",
			Help: "Connections the HTTPS server holds now (handshaking, reading, answering).",
		}),
		connsTotal: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: Namespace, Name: "connections_total",
			Help: "Connections the HTTPS server accepted (after the per-source and --max-conns limits).",
		}),
		storeOps: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: Namespace, Name: "store_operation_duration_seconds",
			Help:    "Store operations by operation (get, list, create, update, update_each (a batch: last-seen times), delete, master_key_id) and result (ok, not_found, exists, busy, timeout, corrupt, error).",
			Buckets: latencyBuckets,
		}, []string{"op", "result"}),
		storeUp: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: Namespace, Name: "store_up",
			Help: "1 if the last probe of the store (a read of its master-key id) succeeded, else 0.",
		}, []string{"store"}),
		etcdMembers: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: Namespace, Name: "etcd_endpoint_up",
			Help: "1 if the etcd endpoint answered its last status probe and knows a leader, else 0.",
		}, []string{"endpoint"}),
	}
	for _, c := range []prometheus.Collector{
		m.requests, m.keyLatency, m.retryAfter, m.handshakes, m.connsInUse, m.connsTotal,
		m.storeOps, m.storeUp, m.etcdMembers,
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// Observe is an audit sink (keyserver.WithAudit, keyserver.Audits): it
// counts the answer and, for key requests, its latency.
func (m *Metrics) Observe(ev keyserver.AuditEvent) {
	status := strconv.Itoa(ev.Status)
	m.requests.WithLabelValues(ev.Outcome, status).Inc()
	if ev.Status == http.StatusTooManyRequests || ev.Status == http.StatusServiceUnavailable {
		if ev.Outcome == keyserver.OutcomeRateLimited || ev.Outcome == keyserver.OutcomeBusy {
			m.retryAfter.WithLabelValues(status).Inc()
		}
	}
	if strings.HasPrefix(ev.Path, keyserver.KeysPath) {
		m.keyLatency.WithLabelValues(ev.Outcome).Observe(ev.DurationMS / 1000)
	}
}

// InstrumentServer makes srv count its connections and time its TLS
// handshakes. Call it before srv serves; it keeps hooks already set.
func (m *Metrics) InstrumentServer(srv *http.Server) {
	prev := srv.ConnState
	srv.ConnState = func(c net.Conn, st http.ConnState) {
		switch st {
		case http.StateNew:
			m.connsTotal.Inc()
			m.connsInUse.Inc()
		case http.StateClosed, http.StateHijacked:
			m.connsInUse.Dec()
		}
		if prev != nil {
			prev(c, st)
		}
	}
	if srv.TLSConfig == nil || srv.TLSConfig.GetConfigForClient != nil {
		return
	}
	base := srv.TLSConfig.Clone()
	// crypto/tls has no handshake-done hook on the server; VerifyConnection
	// runs at its end with or without client certificates. A per-handshake
	// copy of the config carries the start time (a shallow copy: noise
	// beside the handshake's own signature and key exchange).
	srv.TLSConfig.GetConfigForClient = func(*tls.ClientHelloInfo) (*tls.Config, error) {
		start := time.Now()
		c := base.Clone()
		c.VerifyConnection = func(tls.ConnectionState) error {
			m.handshakes.Observe(time.Since(start).Seconds())
			return nil
		}
		return c, nil
	}
}

// Handler serves the registry in the Prometheus text format at Path.
func (m *Metrics) Handler(errLog ulog.Logger) http.Handler {
	mux := http.NewServeMux()
	mux.Handle(Path, promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{
		ErrorLog:          promLogger{errLog},
		Registry:          m.reg,
		EnableOpenMetrics: false,
	}))
	return mux
}

type promLogger struct{ l ulog.Logger }

func (p promLogger) Println(v ...any) { p.l.Printf("metrics: %v", v) }

// Serve answers Handler on ln (plain HTTP: scrapers sit on a management
// network or loopback) until ctx is done.
func (m *Metrics) Serve(ctx context.Context, ln net.Listener, errLog ulog.Logger) error {
	srv := &http.Server{
		Handler:           m.Handler(errLog),
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       time.Minute,
		MaxHeaderBytes:    8 << 10,
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	err := srv.Shutdown(sctx)
	if serr := <-errc; !errors.Is(serr, http.ErrServerClosed) && err == nil {
		err = serr
	}
	return err
}
