// slow-backend: an HTTP/1.1 backend for the meshlet dedup benchmark (bench/run.sh, BENCH_DEDUP=1).
//
// Every request answers 200 "ok" after -delay (default 50 ms), on every address given with
// -listen (comma-separated). The requests it received, over all addresses, are counted when
// they arrive; GET /__count answers that number at once and is not itself counted, so the
// benchmark can read how many requests reached the backend (the upstream requests) before and
// after a run. Standard library only. Only loopback addresses are meant to be used.
package main

import (
	"flag"
	"log"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:18061,127.0.0.1:18062", "comma-separated listen addresses")
	delay := flag.Duration("delay", 50*time.Millisecond, "time taken by every request")
	flag.Parse()

	var served atomic.Int64
	mux := http.NewServeMux()
	mux.HandleFunc("/__count", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		w.Write([]byte(strconv.FormatInt(served.Load(), 10) + "\n"))
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, _ *http.Request) {
		served.Add(1)
		time.Sleep(*delay)
		w.Header().Set("Content-Type", "text/plain")
		w.Write([]byte("ok"))
	})

	var wg sync.WaitGroup
	for _, addr := range strings.Split(*listen, ",") {
		addr = strings.TrimSpace(addr)
		if addr == "" {
			continue
		}
		srv := &http.Server{Addr: addr, Handler: mux, IdleTimeout: 300 * time.Second}
		wg.Add(1)
		go func() {
			defer wg.Done()
			log.Printf("slow-backend listening on %s, delay %s", addr, *delay)
			if err := srv.ListenAndServe(); err != nil {
				log.Fatalf("serve %s: %v", addr, err)
			}
		}()
	}
	wg.Wait()
}
