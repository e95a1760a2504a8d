pub mod client;
pub mod formats;
pub mod model;
pub mod rpc;
pub mod server;
pub mod service;
pub mod store;
