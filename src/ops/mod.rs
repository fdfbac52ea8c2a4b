//! Operating the proxy: the admin server (`/metrics`, `/ready`, `/health`, `/endpoints`, app
//! probes) and the health model behind it. Ops reads the data path's state (destinations,
//! their outcome windows, endpoints); the data path never imports ops.

pub mod admin;
pub mod health;
