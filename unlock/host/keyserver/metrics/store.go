package metrics

import (
	"context"
	"errors"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/unlockrd/unlockrd/unlock/host/keyserver/store"
)

// Store returns st timing every operation into
// unlockrd_store_operation_duration_seconds.
func (m *Metrics) Store(st store.Store) store.Store {
	return &timedStore{st: st, h: m.storeOps}
}

type timedStore struct {
	st store.Store
	h  *prometheus.HistogramVec
}

func (t *timedStore) observe(op string, start time.Time, err error) {
	t.h.WithLabelValues(op, result(err)).Observe(time.Since(start).Seconds())
}

// result names an operation's result by the errors store.Store documents.
func result(err error) string {
	switch {
	case err == nil:
		return "ok"
	case errors.Is(err, store.ErrNotFound):
		return "not_found"
	case errors.Is(err, store.ErrExists):
		return "exists"
	case errors.Is(err, store.ErrBusy):
		return "busy"
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled):
		return "timeout"
	case errors.Is(err, store.ErrCorrupt):
		return "corrupt"
	}
	return "error"
}

func (t *timedStore) Get(ctx context.Context, id string) (store.Host, error) {
	start := time.Now()
	h, err := t.st.Get(ctx, id)
	t.observe("get", start, err)
	return h, err
}

func (t *timedStore) List(ctx context.Context) ([]store.Host, error) {
	start := time.Now()
	hs, err := t.st.List(ctx)
	t.observe("list", start, err)
	return hs, err
}

func (t *timedStore) Create(ctx context.Context, h store.Host) error {
	start := time.Now()
	err := t.st.Create(ctx, h)
	t.observe("create", start, err)
	return err
}

func (t *timedStore) Update(ctx context.Context, id string, fn func(h *store.Host) error) (store.Host, error) {
	start := time.Now()
	h, err := t.st.Update(ctx, id, fn)
	t.observe("update", start, err)
	return h, err
}

// UpdateEach keeps the inner store's batch write (store.EachUpdater).
func (t *timedStore) UpdateEach(ctx context.Context, ids []string, fn func(h *store.Host) error) error {
	start := time.Now()
	err := store.UpdateEach(ctx, t.st, ids, fn)
	t.observe("update_each", start, err)
	return err
}

func (t *timedStore) Delete(ctx context.Context, id string) error {
	start := time.Now()
	err := t.st.Delete(ctx, id)
	t.observe("delete", start, err)
	return err
}

func (t *timedStore) MasterKeyID(ctx context.Context, proposed string) (string, error) {
	start := time.Now()
	id, err := t.st.MasterKeyID(ctx, proposed)
	t.observe("master_key_id", start, err)
	return id, err
}

func (t *timedStore) Close() error { return t.st.Close() }

// WatchStore probes st every interval until ctx is done: a read of the
// master-key id (for etcd a linearizable read, so it fails without a
// quorum) sets unlockrd_store_up{store=kind}; with an etcd client, each
// endpoint's status sets unlockrd_etcd_endpoint_up. The first probe runs
// at once, so a scrape right after start sees the state.
func (m *Metrics) WatchStore(ctx context.Context, kind string, st store.Store, etcd *clientv3.Client, interval time.Duration) {
	up := m.storeUp.WithLabelValues(kind)
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		pctx, cancel := context.WithTimeout(ctx, interval)
		if _, err := st.MasterKeyID(pctx, ""); err != nil {
			up.Set(0)
		} else {
			up.Set(1)
		}
		if etcd != nil {
			for _, ep := range etcd.Endpoints() {
				v := 0.0
				if s, err := etcd.Status(pctx, ep); err == nil && s.Leader != 0 {
					v = 1
				}
				m.etcdMembers.WithLabelValues(ep).Set(v)
			}
		}
		cancel()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
