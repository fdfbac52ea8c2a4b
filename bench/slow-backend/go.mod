module meshlet.bench/slow-backend

go 1.24
