"""The libvirt/QEMU hypervisor driver: domain XML (domain_xml), libvirtd (connection), LibvirtDriver (driver)."""
