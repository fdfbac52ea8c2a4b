// grpc-backend: a minimal gRPC server for the meshlet benchmark.
//
// It serves the standard grpc.health.v1.Health service (Check answers SERVING at once)
// on every address given with -listen (comma-separated), over h2c (no TLS).
// Only loopback addresses are meant to be used.
package main

import (
	"flag"
	"log"
	"net"
	"strings"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:50051,127.0.0.1:50052", "comma-separated listen addresses")
	flag.Parse()

	var wg sync.WaitGroup
	for _, addr := range strings.Split(*listen, ",") {
		addr = strings.TrimSpace(addr)
		if addr == "" {
			continue
		}
		lis, err := net.Listen("tcp", addr)
		if err != nil {
			log.Fatalf("listen %s: %v", addr, err)
		}
		srv := grpc.NewServer()
		hs := health.NewServer()
		hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
		healthpb.RegisterHealthServer(srv, hs)
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := srv.Serve(lis); err != nil {
				log.Printf("serve %s: %v", addr, err)
			}
		}()
		log.Printf("grpc-backend listening on %s", addr)
	}
	wg.Wait()
}
