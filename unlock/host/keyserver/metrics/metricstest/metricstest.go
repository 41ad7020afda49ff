// Package metricstest scrapes a key server's /metrics with the Prometheus
// text parser, so tests and the bench check counters the way Prometheus
// reads them.
package metricstest

import (
	"context"
	"fmt"
	"net/http"
	"strings"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Families is one scrape, by metric name.
type Families map[string]*dto.MetricFamily

// Scrape fetches url (http://ADDR/metrics) and parses it.
func Scrape(ctx context.Context, url string) (Families, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("scrape %s: %w", url, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("scrape %s: %s", url, resp.Status)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	f, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("scrape %s: %w", url, err)
	}
	return f, nil
}

// Sum adds up the series of name whose labels include every pair of
// labels (name=value, ...): counter and gauge values, histogram sample
// counts. A name not exposed sums to 0.
func (f Families) Sum(name string, labels ...string) float64 {
	mf, ok := f[name]
	if !ok {
		return 0
	}
	var sum float64
next:
	for _, m := range mf.GetMetric() {
		for i := 0; i+1 < len(labels); i += 2 {
			found := false
			for _, lp := range m.GetLabel() {
				if lp.GetName() == labels[i] && lp.GetValue() == labels[i+1] {
					found = true
				}
			}
			if !found {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			sum += m.Counter.GetValue()
		case m.Gauge != nil:
			sum += m.Gauge.GetValue()
		case m.Histogram != nil:
			sum += float64(m.Histogram.GetSampleCount())
		case m.Untyped != nil:
			sum += m.Untyped.GetValue()
		}
	}
	return sum
}

// Values returns name's series as "label=value,..." (labels in exposition
// order) to value, for messages.
func (f Families) Values(name string) map[string]float64 {
	out := map[string]float64{}
	mf, ok := f[name]
	if !ok {
		return out
	}
	for _, m := range mf.GetMetric() {
		var ls []string
		for _, lp := range m.GetLabel() {
			ls = append(ls, lp.GetName()+"="+lp.GetValue())
		}
		k := strings.Join(ls, ",")
		switch {
		case m.Counter != nil:
			out[k] += m.Counter.GetValue()
		case m.Gauge != nil:
			out[k] += m.Gauge.GetValue()
		case m.Histogram != nil:
			out[k] += float64(m.Histogram.GetSampleCount())
		}
	}
	return out
}
